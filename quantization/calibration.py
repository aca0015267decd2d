"""Calibration data: random windows of a local text file, or, with no file, text the model
generates itself (data-free), so a fresh machine needs nothing else."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from bitserve.errors import UsageError


def read_text(path: Path) -> str:
    """A UTF-8 text file (a leading byte-order mark is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such text file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def file_calibration(
    tokenizer: Any, path: Path, nsamples: int, seqlen: int, seed: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets of the tokenized file."""
    if nsamples < 1 or seqlen < 1:
        raise UsageError(f"need --nsamples and --seqlen >= 1, got {nsamples} and {seqlen}")
    text = read_text(path)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seqlen + 1:
        raise UsageError(f"{path}: {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    batch = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    info = {
        "source": "file",
        "path": str(path),
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
    }
    return batch, info


@torch.no_grad()
def generated_calibration(
    model: PreTrainedModel,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    batch_size: int = 16,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Data-free calibration: the model samples `nsamples` sequences of `seqlen` tokens from its
    BOS token (temperature 1, top-k 50), each starting from a random first token."""
    if seqlen < 3:
        raise UsageError(
            f"--seqlen {seqlen}: self-generated calibration needs at least 3 tokens per sequence "
            "(BOS, a random token, a generated one); pass --calib FILE for shorter windows"
        )
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    out = []
    for start in range(0, nsamples, batch_size):
        n = min(batch_size, nsamples - start)
        first = torch.randint(0, vocab, (n, 1), generator=gen)
        ids = torch.cat([torch.full((n, 1), bos), first], dim=1)
        torch.manual_seed(seed + start)
        seqs = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_k=50,
            temperature=1.0,
            max_new_tokens=seqlen - 2,
            min_new_tokens=seqlen - 2,
            pad_token_id=bos,
        )
        out.append(seqs[:, :seqlen])
    info = {"source": "self-generated", "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    batch = torch.cat(out)
    info["sha256"] = hashlib.sha256(batch.numpy().tobytes()).hexdigest()
    return batch, info
