"""Every Triton kernel compiled for a real GPU (sm_90), on a machine that has none.

The other kernel tests run under ``TRITON_INTERPRET=1`` (tests/conftest.py), and the
interpreter is more forgiving than the GPU compiler: it runs a @jit function as Python,
so it accepts, for one, a plain module global read inside a kernel, which the compiler
refuses ("Cannot access global variable"). That bug once sat in quant_triton.py
(``ROUND_MAGIC``) with every CPU test green. Here each kernel goes the whole way (TTIR,
TTGIR, LLVM, PTX, and the ptxas that Triton ships, down to a cubin) for
``GPUTarget("cuda", 90, 32)``, typed as its wrapper launches it. No GPU or CUDA driver is
needed, and none is looked for: if this machine cannot compile for a GPU the tests fail,
they do not skip.

The compiles run in one child process: Triton picks the interpreter when it is first
imported, and this process imported it with ``TRITON_INTERPRET=1``. The child loads each
kernel's file from this checkout (not from wherever byteswarm is installed).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from byteswarm.optim.codecs import INT8_BLOCK, MIN_BLOCK
from byteswarm.optim.kernels.outer_triton import BLOCK as OUTER_BLOCK
from byteswarm.optim.kernels.rademacher_triton import BLOCK_WORDS

ROOT = Path(__file__).resolve().parents[1]
TARGET = ("cuda", 90, 32)  # Hopper (H100/H200), warp size 32
PACKAGE_DIRS = ("optim", "protocols", "node", "sim")  # byteswarm.<dir> (pyproject.toml)
SCANNED_DIRS = (*PACKAGE_DIRS, "scripts", "examples")


@dataclass(frozen=True)
class Kernel:
    """How a wrapper launches one kernel. Argument names must match the kernel's own."""

    params: dict[str, str]  # every argument in order: "*fp32" etc., "int", "fp32", "constexpr"
    constexprs: dict[str, int]  # the wrapper's values
    extra: tuple[dict[str, int], ...] = ()  # further values worth a compile each
    fp_fusion: bool = True  # the wrapper passes enable_fp_fusion=False where this is False
    jit_here: bool = False  # a plain function its script wraps in triton.jit at run time


# The int8 kernels are compiled at the default and the smallest block, not at MAX_BLOCK
# (65536): the same code in a larger tile, and about 15 s of LLVM and ptxas per kernel.
KERNELS = {
    "optim/kernels/quant_triton.py:_quantize_kernel": Kernel(
        {"x_ptr": "*fp32", "q_ptr": "*i8", "s_ptr": "*fp32", "n": "int", "BLOCK": "constexpr"},
        {"BLOCK": INT8_BLOCK}, extra=({"BLOCK": MIN_BLOCK},),
        fp_fusion=False),
    "optim/kernels/quant_triton.py:_dequantize_kernel": Kernel(
        {"q_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*fp32", "n": "int",
         "BLOCK": "constexpr"},
        {"BLOCK": INT8_BLOCK}, extra=({"BLOCK": MIN_BLOCK},),
        fp_fusion=False),
    "optim/kernels/outer_triton.py:_noloco_kernel": Kernel(
        {"phi_ptr": "*fp32", "delta_ptr": "*fp32", "theta_ptr": "*fp32", "pm_ptr": "*fp32",
         "tm_ptr": "*fp32", "n": "int", "alpha": "fp32", "beta": "fp32", "gamma": "fp32",
         "BLOCK": "constexpr"},
        {"BLOCK": OUTER_BLOCK}, fp_fusion=False),
    "optim/kernels/outer_triton.py:_diloco_kernel": Kernel(
        {"phi_ptr": "*fp32", "m_ptr": "*fp32", "g_ptr": "*fp32", "theta_ptr": "*fp32",
         "n": "int", "neg_lr": "fp32", "mu": "fp32", "BLOCK": "constexpr"},
        {"BLOCK": OUTER_BLOCK}, fp_fusion=False),
    "optim/kernels/rademacher_triton.py:_rademacher_kernel": Kernel(
        {"src_ptr": "*fp32", "dst_ptr": "*fp32", "seeds_ptr": "*i64", "coeffs_ptr": "*fp32",
         "n_records": "int", "n_elements": "int", "BLOCK_WORDS": "constexpr"},
        {"BLOCK_WORDS": BLOCK_WORDS},
        extra=({"n_records": 1},)),  # perturb: one record, so a constant trip count
    # Not in the package, but it runs on the GPU in gpu_check.py's kernel check.
    "scripts/gpu_kernels.py:_randint_body": Kernel(
        {"out_ptr": "*i32", "offs_ptr": "*i64", "seed_ptr": "*i64", "n": "int",
         "BLOCK": "constexpr"},
        {"BLOCK": 1024}, jit_here=True),  # kernel_philox launches it with BLOCK=1024
}

# The launcher types an int argument by its value (triton.runtime.jit's specialisation):
# 1 becomes a constant, a multiple of 16 gets a divisibility hint, 2**31 and up is i64.
INT_VALUES = (1, 1000, 4096, 2**31 + 16)
PLAIN_INT = 1000  # for the extra compiles


def _int_type(v: int) -> tuple[str, bool]:
    """(signature entry, divisible by 16) for an int the launcher sees."""
    if v == 1:
        return "constexpr", False
    return ("i32" if v < 2**31 else "i64"), v % 16 == 0


def _job(path: str, name: str, k: Kernel, ints: dict[str, int], consts: dict[str, int],
         aligned: bool = True) -> dict:
    """One compile for the child: signature, constants and hints as the launcher builds them.
    Torch allocations are 16-byte aligned, so pointers carry the hint unless ``aligned`` is
    False (a view at an odd offset)."""
    signature, constexprs, divisible = {}, dict(consts), []
    for arg, kind in k.params.items():
        if kind == "int":
            kind, div = _int_type(ints[arg])
            if kind == "constexpr":
                constexprs[arg] = ints[arg]
            elif div:
                divisible.append(arg)
        elif kind.startswith("*") and aligned:
            divisible.append(arg)
        signature[arg] = kind
    label = ", ".join([f"{a}={v}" for a, v in {**ints, **consts}.items()]
                      + ([] if aligned else ["unaligned pointers"]))
    return {"path": path, "name": name, "label": label, "signature": signature,
            "constexprs": constexprs, "divisible": divisible, "jit_here": k.jit_here,
            "options": {} if k.fp_fusion else {"enable_fp_fusion": False}}


def _jobs(key: str, k: Kernel) -> list[dict]:
    path, name = key.split(":")
    int_args = [a for a, kind in k.params.items() if kind == "int"]
    jobs = [_job(path, name, k, dict.fromkeys(int_args, v), k.constexprs) for v in INT_VALUES]
    jobs.append(_job(path, name, k, dict.fromkeys(int_args, PLAIN_INT), k.constexprs,
                     aligned=False))
    for extra in k.extra:
        ints = {a: extra.get(a, PLAIN_INT) for a in int_args}
        consts = {**k.constexprs, **{a: v for a, v in extra.items() if a not in int_args}}
        jobs.append(_job(path, name, k, ints, consts))
    return jobs


# Runs in the child, with TRITON_INTERPRET=0: argv is the request file and the answer file.
CHILD = r"""
import importlib.util, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

req = json.load(open(sys.argv[1]))
target = GPUTarget(*req["target"])
modules = {}

def load(path):
    if path not in modules:
        parts = path[:-3].split("/")
        # Package files load under their package name, so relative imports resolve.
        name = ".".join(["byteswarm", *parts]) if parts[0] in req["package_dirs"] else parts[-1]
        spec = importlib.util.spec_from_file_location(name, f"{req['root']}/{path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        modules[path] = mod
    return modules[path]

answers = []
for job in req["jobs"]:
    try:
        fn = getattr(load(job["path"]), job["name"])
        if job["jit_here"]:
            fn = triton.jit(fn)
        if not isinstance(fn, JITFunction):
            raise TypeError(f"{type(fn).__name__}, not a JITFunction: is the interpreter on?")
        if fn.arg_names != list(job["signature"]):
            raise TypeError(f"kernel takes {fn.arg_names}, the test's table says "
                            f"{list(job['signature'])}: update KERNELS")
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in job["divisible"]}
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"],
                        attrs=attrs)
        compiled = triton.compile(src, target=target, options=job["options"])
        answers.append({"cubin_bytes": len(compiled.asm["cubin"]), "error": None})
    except Exception as e:
        answers.append({"cubin_bytes": 0, "error": f"{type(e).__name__}: {e}"[-4000:]})
json.dump(answers, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, list[tuple[str, dict]]]:
    """Kernel key -> [(variant label, {"cubin_bytes", "error"})], from one child process."""
    tmp = tmp_path_factory.mktemp("kernels_compile")
    jobs = [job for key, k in KERNELS.items() for job in _jobs(key, k)]
    request, answer = tmp / "request.json", tmp / "answer.json"
    request.write_text(json.dumps({"root": str(ROOT), "target": TARGET, "jobs": jobs,
                                   "package_dirs": PACKAGE_DIRS}))
    # A fresh cache: nothing compiled earlier stands in for a compile, and ~/.triton is
    # left alone. Globals are refused as a GPU run refuses them, whatever the caller's env.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp / "cache"),
           "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(request), str(answer)], env=env,
                          cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the compiling child failed:\n{proc.stderr[-4000:]}"
    out: dict[str, list[tuple[str, dict]]] = {key: [] for key in KERNELS}
    for job, ans in zip(jobs, json.loads(answer.read_text()), strict=True):
        out[f"{job['path']}:{job['name']}"].append((job["label"], ans))
    return out


@pytest.mark.slow  # 25-30 s in all on one core, most of it LLVM and ptxas
@pytest.mark.parametrize("key", list(KERNELS), ids=[k.split(":")[1] for k in KERNELS])
def test_compiles_for_sm90(compiled, key):
    by_error: dict[str, list[str]] = {}  # one error often fails every variant: say it once
    for label, ans in compiled[key]:
        if ans["error"]:
            by_error.setdefault(ans["error"], []).append(label)
    failed = [f"--- {'; '.join(labels)}\n{err}" for err, labels in by_error.items()]
    assert not failed, f"{key} does not compile for {TARGET}:\n" + "\n".join(failed)
    # A cubin at the end means ptxas ran, not just Triton's front end.
    assert all(ans["cubin_bytes"] > 0 for _, ans in compiled[key])


def _jit_functions(path: Path) -> set[str]:
    """Names of the functions in a file decorated with ``@triton.jit`` (or ``@jit``, with or
    without arguments) or wrapped as ``triton.jit(name)``."""
    def is_jit(node: ast.expr) -> bool:
        node = node.func if isinstance(node, ast.Call) else node
        return ast.unparse(node) in ("triton.jit", "jit")

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef) and any(map(is_jit, node.decorator_list)):
            found.add(node.name)
        elif (isinstance(node, ast.Call) and is_jit(node.func) and node.args
              and isinstance(node.args[0], ast.Name)):
            found.add(node.args[0].id)
    return found


def test_every_kernel_is_in_the_table():
    # A new kernel needs a signature here, or the tests above never compile it.
    found = {f"{p.relative_to(ROOT).as_posix()}:{name}"
             for d in SCANNED_DIRS if (ROOT / d).is_dir()
             for p in sorted((ROOT / d).rglob("*.py")) for name in _jit_functions(p)}
    assert found == set(KERNELS), (f"not in KERNELS: {sorted(found - set(KERNELS))}; "
                                   f"in KERNELS but gone: {sorted(set(KERNELS) - found)}")
    names = [k.split(":")[1] for k in KERNELS]
    assert len(names) == len(set(names)), "test ids are the kernel names: keep them unique"
