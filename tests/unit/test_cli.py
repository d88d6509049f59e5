from mlx_flash.cli import split_worker_args


def test_engine_flags_and_extra_models_go_to_the_workers() -> None:
    args = ["--workers", "2", "--memory-limit", "2", "--model", "a", "--pin", "b", "--model=c", "--port=0"]
    assert split_worker_args(args) == (
        ["--workers", "2", "--model", "a", "--port=0"],
        ["--model=c", "--memory-limit", "2", "--pin", "b"],
    )


def test_an_explicit_separator_is_kept_and_sidecar_flags_stay() -> None:
    assert split_worker_args(["--workers", "2", "--", "--pin", "x"]) == (["--workers", "2"], ["--pin", "x"])
    assert split_worker_args(["--policy", "sticky", "--help"]) == (["--policy", "sticky", "--help"], [])
