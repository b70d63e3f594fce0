"""Write a copy of a model folder whose decoder weights carry more (or less) quantisation noise.

The default model is SmolLM2-135M dequantised from a Q4_1 GGUF; the unquantised weights are not
available offline, so the effect of the 4-bit quantisation on For-Value cannot be measured
directly. This probe measures its sensitivity instead: every ``nn.Linear`` weight of the
decoder layers is re-quantised blockwise, Q4_1 style (blocks of 32 along the input dimension,
per-block minimum and scale, ``2**bits`` levels), and the copy is saved with its tokenizer. If
For-Value's quality barely moves when the quantisation step doubles (``--bits 3``), the 4-bit
quantisation of the default model is unlikely to be what limits it; ``--bits 8`` is the
near-identity control.

Usage::

    python -m tools.requantise_model --bits 3 --out /tmp/smollm2-q3
    python -m tools.bench quality --out DIR -- --model /tmp/smollm2-q3 --tasks sentence_transformations \\
        --methods forvalue --repro none --n-train 15 --n-test 3
"""

from __future__ import annotations

import argparse
import sys

import torch


def requantise_(weight: torch.Tensor, bits: int, block: int = 32) -> float:
    """Quantise ``weight`` (out, in) in place, blockwise along ``in``; returns the relative error."""
    out_f, in_f = weight.shape
    if in_f % block:
        raise ValueError(f"input dimension {in_f} is not a multiple of the block size {block}")
    w = weight.detach().reshape(out_f, in_f // block, block)
    lo = w.min(dim=-1, keepdim=True).values
    hi = w.max(dim=-1, keepdim=True).values
    scale = (hi - lo).clamp_min(1e-12) / (2**bits - 1)
    q = torch.round((w - lo) / scale) * scale + lo
    err = float((q - w).norm() / w.norm())
    weight.data.copy_(q.reshape(out_f, in_f))
    return err


def main(argv: list[str] | None = None) -> int:
    from forvalue.indexer.model_runner import load_runner
    from forvalue.schemas.config import ModelConfig

    ap = argparse.ArgumentParser(prog="python -m tools.requantise_model", description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, required=True, help="levels per block = 2**bits (Q4_1 has 4)")
    ap.add_argument("--model", default=None, help="model folder (default: the product's default model)")
    ap.add_argument("--out", required=True, help="folder to write the re-quantised copy to")
    args = ap.parse_args(argv)

    runner = load_runner(ModelConfig(path=args.model, device="cpu"))
    errors = []
    with torch.no_grad():
        for name, module in runner.model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                errors.append(requantise_(module.weight, args.bits))
    runner.model.save_pretrained(args.out)
    runner.tokenizer.save_pretrained(args.out)
    print(
        f"re-quantised {len(errors)} decoder weights to {args.bits} bits (blocks of 32): relative error "
        f"mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
