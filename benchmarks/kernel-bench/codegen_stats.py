"""Instruction counts of the cross-entropy row kernel compiled for a GPU architecture, on a machine without a GPU.

Triton compiles for any NVIDIA target offline (it ships ``ptxas`` and ``cuobjdump``), so the generated PTX/SASS of a
launch setting can be inspected on a machine without a GPU. The row kernel is bounded by the instructions it issues
between its block reductions (one program per row, 8 to 32 warps, one resident program per SM at 32 warps), so
the per-element instruction mix explains differences the GPU sweep measures: e.g. ``tl.exp`` lowers to the
non-flushing ``ex2.approx.f32`` plus subnormal handling, ``exp2`` of a pre-scaled argument to one
``ex2.approx.ftz.f32``.

    python benchmarks/kernel-bench/codegen_stats.py                       # sm_90, every fwd_grad setting of the sweep
    python benchmarks/kernel-bench/codegen_stats.py --arch 90 --launch 4096 8 0 0 1 1 1

Counts are static (instructions in the code, not executed); registers and spill stack come from cuobjdump.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# SASS opcodes worth counting for this kernel (memory, special-function unit, barriers, selects, compares)
OPCODES = ("LDG", "STG", "MUFU", "BAR", "FMUL", "FADD", "FFMA", "FSEL", "ISETP", "FSETP", "SHFL", "LDL", "STL")


@dataclass(frozen=True)
class CodegenStats:
    launch: tuple
    registers: int
    stack_bytes: int
    sass_instructions: int
    opcodes: dict
    ptx: str


def _ce_module():
    return importlib.import_module("fms_acceleration_accelerate_kernels.cross_entropy")


def compile_ce_row_kernel(launch: tuple, arch: int = 90, vocab: int = 128256, dtype: str = "bf16") -> CodegenStats:
    """Compile ``_ce_row_kernel`` (gradient-writing, no softcap/smoothing) with ``launch`` settings for ``sm_<arch>``."""
    ce = _ce_module()
    block, warps, per_sm, lane, hints, reverse, fixup = ce._launch_settings(vocab, "fwd_grad", launch)
    signature = {
        "LOGITS": f"*{dtype}", "TARGET": "*i64", "LOSS": "*fp32", "LSE": "*fp32", "GRAD": f"*{dtype}",
        "GRAD_SCALE": "*fp32", "stride_logits": "i32", "stride_grad": "i32", "n_rows": "i32", "n_cols": "i32",
        "ignore_index": "i32", "inv_scale": "fp32", "softcap": "fp32", "smoothing": "fp32",
    }  # fmt: skip
    constexprs = {
        "HAS_SOFTCAP": False, "HAS_SMOOTHING": False, "WRITE_GRAD": True, "LANE_STATS": lane, "L2_HINTS": hints,
        "REVERSE": reverse, "FIXUP": fixup, "PERSISTENT": per_sm > 0, "BLOCK": block,
    }  # fmt: skip
    names = list(signature) + list(constexprs)
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    # pointers and the row strides / vocab 16-divisible, as Triton specializes them at run time for these shapes
    divisible = ("LOGITS", "TARGET", "LOSS", "LSE", "GRAD", "GRAD_SCALE", "stride_logits", "stride_grad", "n_cols")
    source = ASTSource(
        fn=ce._ce_row_kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in divisible},
    )
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    instructions = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    counts = {op: sum(1 for i in instructions if i == op) for op in OPCODES}
    return CodegenStats(
        launch=(block, warps, per_sm, lane, hints, reverse, fixup),
        registers=int(found.group(1)) if found else -1,
        stack_bytes=int(found.group(2)) if found else -1,
        sass_instructions=len(instructions),
        opcodes=counts,
        ptx=kernel.asm["ptx"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability without the dot (90: H100/H200)")
    parser.add_argument("--launch", type=int, nargs="+", action="append",
                        help="a launch setting (7 numbers; booleans as 0/1); repeatable")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object per setting (PTX included)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU target")
    ce = _ce_module()
    if args.launch:
        launches = [tuple(launch) for launch in args.launch]
    else:
        launches = [ce._LAUNCH["fwd_grad"], *ce._LAUNCH_BY_GPU.get("H200", {}).values()]
        launches += [(*shape, 0, 0, fixup) for shape in ((32768, 32, 0, 0), (4096, 8, 0, 0)) for fixup in (0, 1)]
    if args.json:
        for launch in launches:
            print(json.dumps(dataclasses.asdict(compile_ce_row_kernel(tuple(launch), args.arch))))
        return
    print(f"{'launch':44s} {'regs':>4s} {'stack':>5s} {'SASS':>5s} " + " ".join(f"{op:>5s}" for op in OPCODES))
    for launch in launches:
        st = compile_ce_row_kernel(tuple(launch), args.arch)
        print(f"{st.launch!s:44s} {st.registers:4d} {st.stack_bytes:5d} {st.sass_instructions:5d} "
              + " ".join(f"{st.opcodes[op]:5d}" for op in OPCODES))  # fmt: skip


if __name__ == "__main__":
    main()
