"""Compile the fused Triton kernels for a GPU architecture without a GPU, and report their
resources: a check of what Triton's CPU interpreter cannot see (the real lowering of tl.gather,
tl.join and the atomics, shared memory, registers, spills) before device time is spent.

    python scripts/compile_triton_kernels.py               # sm_90 (H100 / H200), blocks 64, 128

Needs Triton's bundled ptxas / cuobjdump (the `triton` wheel has them); TRITON_INTERPRET must be
unset, since the interpreter replaces the kernels by Python functions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels by Python functions")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from musicgpt.attention import triton_kernel as ta  # noqa: E402

STRIDES = ("sqb", "sqh", "sqt", "sob", "soh", "sot")


def signature(kernel, pointers: dict[str, str]) -> dict[str, str]:
    """Triton's type string for every argument of `kernel`, in order."""
    names = kernel.arg_names
    types = {"H": "i32", "T": "i32", "R": "i32", "scale": "fp32", **{s: "i32" for s in STRIDES}}
    consts = {"D", "BLOCK", "PREC", "KV"}
    return {n: "constexpr" if n in consts else pointers.get(n) or types[n] for n in names}


def resources(cubin: bytes) -> dict[str, str]:
    """Registers and stack (spill) bytes per thread, and static shared memory, from cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    fields = " ".join(line.strip() for line in out.splitlines() if "REG:" in line).split()
    return dict(f.split(":", 1) for f in fields if ":" in f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    p.add_argument("--blocks", default="64,128")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warps", default="", help="comma list of num_warps to try (default: the "
                   "kernel's own choice per block)")
    p.add_argument("--stages", default="", help="comma list of num_stages to try (default: "
                   "Triton's)")
    args = p.parse_args()
    dt = f"*{args.dtype}"
    data = {n: dt for n in ("Q", "K", "V", "E", "O", "DO", "DQ", "DK", "DV")}
    data.update(LSE="*fp32", DELTA="*fp32", DE="*fp32")
    kernels = [("forward", ta.forward_kernel, data, {}),
               ("dq / dE_r pass", ta.backward_dq_de_kernel, data, {"KV": False}),
               ("dq / dE_r + dk / dv, one pass", ta.backward_dq_de_kernel,
                {**data, "DK": "*fp32", "DV": "*fp32"}, {"KV": True}),
               ("dk / dv pass", ta.backward_dk_dv_kernel, data, {})]
    target = GPUTarget("cuda", args.arch, 32)
    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.dtype}, head width {args.head_dim}\n")
    print("| kernel | block | warps | stages | registers / thread | stack (spill) bytes / thread |")
    print("|---|---:|---:|---:|---:|---:|")
    for block in (int(b) for b in args.blocks.split(",")):
        for warps in [int(w) for w in args.warps.split(",") if w] or [ta.num_warps_for(block)]:
            for stages in [int(n) for n in args.stages.split(",") if n] or [None]:
                options = {"num_warps": warps, **({"num_stages": stages} if stages else {})}
                for name, kernel, pointers, extra in kernels:
                    consts = {"D": args.head_dim, "BLOCK": block, "PREC": "tf32", **extra}
                    compiled = triton.compile(
                        ASTSource(kernel, signature(kernel, pointers), constexprs=consts),
                        target=target, options=options)
                    use = resources(compiled.asm["cubin"])
                    print(f"| {name} | {block} | {warps} | {stages or 'default'} "
                          f"| {use['REG']} | {use['STACK']} |", flush=True)


if __name__ == "__main__":
    main()
