"""Perplexity on a text file: non-overlapping windows of `seqlen` tokens."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from bitserve.errors import UsageError
from bitserve.quantization.calibration import read_text


def eval_windows(tokenizer: Any, path: Path, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """The evaluation text as [windows, seqlen] token ids (the tail shorter than seqlen dropped)."""
    if seqlen < 2 or (max_windows is not None and max_windows < 1):
        raise UsageError(
            f"need --seqlen >= 2 and --max-windows >= 1, got {seqlen} and {max_windows}"
        )
    text = read_text(path)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen
    if n == 0:
        raise UsageError(f"{path}: fewer than --seqlen {seqlen} tokens")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: Any,
    path: Path,
    seqlen: int = 512,
    max_windows: int | None = 40,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """exp(mean next-token NLL) over every predicted token of every window."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    windows = eval_windows(tokenizer, path, seqlen, max_windows)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for start in tqdm(
        range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress
    ):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += ids[:, 1:].numel()
    return {
        "perplexity": math.exp(nll / count),
        "text": str(path),
        "seqlen": seqlen,
        "windows": len(windows),
        "tokens": count,
        "seconds": round(time.perf_counter() - t0, 2),
    }
