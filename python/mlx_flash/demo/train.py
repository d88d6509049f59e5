"""Train the embedded demo model: a tiny `qwen3_moe` (8 experts, top-2) on synthetic chat data.

Offline only; PyTorch (CPU) is used here because it trains ~18x faster than MLX's CPU backend,
and it is never a runtime dependency. The PyTorch module below mirrors mlx-lm's
`models/qwen3_moe.py` operation for operation and is exported in mlx-lm's own weight layout
(`switch_mlp` stacked experts), so `mlx_lm.load` reads the result directly.

    pip install torch==2.13.0 tokenizers safetensors jinja2
    python -m mlx_flash.demo.train --out python/mlx_flash/demo/model
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn

from mlx_flash.demo import data

CONFIG: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "intermediate_size": 384,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 48,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "moe_intermediate_size": 128,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}
TASK_WEIGHTS = {"add": 60, "json": 8, "echo": 16, "greet": 4, "tool": 12}


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(rng: random.Random, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Digits one by one: arithmetic is far easier to learn over single-digit tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=data.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [data.render(m, t) for _, m, t in (data.sample_conversation(rng) for _ in range(20000))]
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in data.ADDED_TOKENS])
    return tok


# ---------------------------------------------------------------- model (mirrors mlx-lm qwen3_moe)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: Tensor, base: float) -> Tensor:
    # mlx nn.RoPE(traditional=False): rotate the two halves of each head.
    d = x.shape[-1]
    pos = torch.arange(x.shape[-2], dtype=torch.float32)
    freqs = base ** (-torch.arange(0, d // 2, dtype=torch.float32) * 2 / d)
    ang = pos[:, None] * freqs[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        h, nh, nkv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.nh, self.nkv, self.hd, self.base = nh, nkv, hd, c["rope_theta"]
        self.q_proj = nn.Linear(h, nh * hd, bias=False)
        self.k_proj = nn.Linear(h, nkv * hd, bias=False)
        self.v_proj = nn.Linear(h, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)
        self.q_norm = RMSNorm(hd, c["rms_norm_eps"])
        self.k_norm = RMSNorm(hd, c["rms_norm_eps"])

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.nh, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, self.base), rope(k, self.base)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class SparseMoe(nn.Module):
    """Router softmax → top-k → renormalise → SwiGLU experts, as mlx-lm's Qwen3MoeSparseMoeBlock."""

    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        h, i, e = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"]
        self.k = c["num_experts_per_tok"]
        self.gate = nn.Linear(h, e, bias=False)
        # Stacked expert weights in mlx-lm's SwitchGLU layout: [experts, out, in].
        self.gate_proj = nn.Parameter(torch.randn(e, i, h) * 0.02)
        self.up_proj = nn.Parameter(torch.randn(e, i, h) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(e, h, i) * 0.02)
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        probs = torch.softmax(self.gate(flat).float(), dim=-1)
        scores, inds = probs.topk(self.k, dim=-1)
        scores = scores / scores.sum(-1, keepdim=True)
        # Sort (token, slot) pairs by expert so each expert runs one dense matmul on its tokens.
        order = inds.reshape(-1).argsort()
        counts = torch.bincount(inds.reshape(-1), minlength=probs.shape[-1]).tolist()
        xs = flat[order // self.k].split(counts)
        ys = [
            (F.silu(xe @ self.gate_proj[e].T) * (xe @ self.up_proj[e].T)) @ self.down_proj[e].T
            for e, xe in enumerate(xs)
        ]
        y = torch.cat(ys)[order.argsort()].view(-1, self.k, h)
        out = (y * scores.unsqueeze(-1)).sum(1)
        # Switch-style load balancing over real (non-pad) tokens keeps every expert in use.
        m = mask.reshape(-1, 1).float()
        routed = torch.zeros_like(probs).scatter(-1, inds, 1.0)
        frac = (routed * m).sum(0) / (m.sum() * self.k)
        mean_p = (probs * m).sum(0) / m.sum()
        self.aux_loss = probs.shape[-1] * (frac * mean_p).sum()
        return out.reshape(b, s, h)


class Layer(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = SparseMoe(c)
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h), mask)


class DemoMoe(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList([Layer(c) for _ in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.embed_tokens(ids)
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
        for layer in self.layers:
            h = layer(h, mask)
        return self.norm(h) @ self.embed_tokens.weight.T  # tied embeddings

    def aux_loss(self) -> Tensor:
        return sum((layer.mlp.aux_loss for layer in self.layers), torch.zeros(()))

    def mlx_weights(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, p in self.state_dict().items():
            name = name.replace("mlp.gate_proj", "mlp.switch_mlp.gate_proj.weight")
            name = name.replace("mlp.up_proj", "mlp.switch_mlp.up_proj.weight")
            name = name.replace("mlp.down_proj", "mlp.switch_mlp.down_proj.weight")
            out["model." + name] = p.detach().contiguous().clone()
        return out


# ---------------------------------------------------------------- data and training


def encode_example(
    tok: Tokenizer, msgs: list[data.Message], tools: list[data.Tool] | None
) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and, per token, whether it is assistant output to learn."""
    text = data.render(msgs, tools)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            start = len(data.render(msgs[:i], tools, gen=True))
            end = len(data.render(msgs[: i + 1], tools)) - 1  # learn <|im_end|>, not the newline after
            spans.append((start, end))
    enc = tok.encode(text)
    learn = [any(s <= a < e for s, e in spans) for a, _ in enc.offsets]
    return enc.ids, learn


def make_batch(tok: Tokenizer, rng: random.Random, budget: int, pad: int) -> tuple[Tensor, Tensor]:
    """A batch of one task, about `budget` tokens: long tool conversations come in fewer rows."""
    task = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()), k=1)[0]
    examples: list[tuple[list[int], list[bool]]] = []
    while not examples or len(examples) * len(examples[0][0]) < budget:
        t, msgs, tools = data.sample_conversation(rng)
        if t == task:  # one task per batch keeps padding small
            examples.append(encode_example(tok, msgs, tools))
    size, n = len(examples), max(len(ids) for ids, _ in examples)
    ids = torch.full((size, n), pad, dtype=torch.long)
    labels = torch.full((size, n), -100, dtype=torch.long)
    for row, (x, learn) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        for j in range(1, len(x)):
            if learn[j]:
                labels[row, j - 1] = x[j]
    return ids, labels


@torch.no_grad()
def greedy(model: DemoMoe, tok: Tokenizer, prompt: str, eos: int, limit: int = 8) -> str:
    ids = tok.encode(prompt).ids
    out: list[int] = []
    for _ in range(limit):
        nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
    return tok.decode(out)


def held_out_accuracy(model: DemoMoe, tok: Tokenizer, eos: int, n: int, seed: int) -> float:
    pairs = random.Random(seed).sample(data.held_out_pairs(), n)
    ok = 0
    for a, b in pairs:
        prompt = data.render([{"role": "user", "content": f"What is {a}+{b}?"}], None, gen=True)
        ok += greedy(model, tok, prompt, eos) == str(a + b)
    return ok / n


def save(out: Path, model: DemoMoe, tok: Tokenizer, config: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.mlx_weights(), str(out / "model.safetensors"), metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": data.CHAT_TEMPLATE,
        "eos_token": data.EOS_TOKEN,
        "pad_token": data.PAD_TOKEN,
        "bos_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--aux", type=float, default=0.05, help="load-balancing loss weight")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=500)
    args = p.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = build_tokenizer(rng, args.vocab)
    eos, pad = tok.token_to_id(data.EOS_TOKEN), tok.token_to_id(data.PAD_TOKEN)
    config = {**CONFIG, "vocab_size": tok.get_vocab_size(), "eos_token_id": eos}
    model = DemoMoe(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {tok.get_vocab_size()}, parameters {n_params / 1e6:.2f}M", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = min(200, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        ids, labels = make_batch(tok, rng, args.batch_tokens, pad)
        logits = model(ids, ids != pad)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        total = loss + args.aux * model.aux_loss()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            print(
                f"step {step} loss {loss.item():.4f} aux {model.aux_loss().item():.3f} "
                f"{(time.time() - t0) / step:.3f}s/step",
                flush=True,
            )
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            acc = held_out_accuracy(model, tok, eos, 100, args.seed)
            model.train()
            print(f"step {step} held-out accuracy {acc:.2%}", flush=True)
            save(args.out, model, tok, config)
    print(f"saved to {args.out} after {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
