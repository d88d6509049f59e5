from pathlib import Path

import pytest

from mlx_flash.cli import check_worker_args, main, split_worker_args


def test_engine_flags_and_extra_models_go_to_the_workers() -> None:
    args = ["--workers", "2", "--memory-limit", "2", "--model", "a", "--pin", "b", "--model=c", "--port=0"]
    assert split_worker_args(args) == (
        ["--workers", "2", "--model", "a", "--port=0"],
        ["--model=c", "--memory-limit", "2", "--pin", "b"],
    )


def test_an_explicit_separator_is_kept_and_sidecar_flags_stay() -> None:
    assert split_worker_args(["--workers", "2", "--", "--pin", "x"]) == (["--workers", "2"], ["--pin", "x"])
    assert split_worker_args(["--policy", "sticky", "--help"]) == (["--policy", "sticky", "--help"], [])


def test_flags_and_models_every_worker_would_reject_are_refused_up_front(tmp_path: Path) -> None:
    check_worker_args([], [])  # demo
    check_worker_args(["--model", "org/not-downloaded-yet"], ["--pin", "qwen3-moe-30b-a3b"])
    aliases = tmp_path / "aliases.toml"
    aliases.write_text(f'[aliases]\nmine = "{tmp_path}"\n')
    check_worker_args(["--model=mine"], ["--aliases", str(aliases)])
    refused = {
        "--kv-bits must be": ([], ["--kv-bits", "99"]),
        "bad size 'banana'": ([], ["--memory-limit", "banana"]),
        "bytes are whole; a fraction needs a unit": ([], ["--expert-memory", "1.5"]),
        "invalid int value": ([], ["--max-queue", "many"]),
        "unrecognized arguments: --bogus": ([], ["--bogus"]),
        "model directory not found": (["--model", str(tmp_path / "nope")], []),
        "model directory not found: gone": ([], ["--pin", "gone"]),
        "cannot read aliases": ([], ["--aliases", str(tmp_path / "none.toml")]),
        "must divide the model's head size 48": ([], ["--kv-bits", "4"]),  # demo's heads
    }
    for message, (sidecar, workers) in refused.items():
        with pytest.raises((ValueError, OSError), match=message):
            check_worker_args(sidecar, workers)


@pytest.mark.parametrize("command", ["worker", "fit", "browse", "chat", "mcp", "experts"])
def test_every_command_prints_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0 and "usage:" in capsys.readouterr().out
