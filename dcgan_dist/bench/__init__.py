"""The bench (`python -m dcgan_dist.bench`): how fast one DCGAN training step is, against the reference.

It builds the pytorch/examples DCGAN step and our step in several variants, all at the same image
size and batch, then times them interleaved: each repeat runs every variant for `--steps` steps in
turn, so a slow spell of a shared machine hits all of them alike, and the table reports each
variant's median over the repeats (the first repeat of each variant right after its build, so a
cold torch.compile of a later variant cannot spend a total budget before the others ran). One
table, one process:

    variant | img/s | vs reference | peak memory | GFLOP/step | TFLOP/s   (+ share of bf16 peak on CUDA)

Peak memory is the CUDA allocator's high-water mark over the variant's timed steps on a GPU, and on
a CPU the rise of the process's resident set (VmHWM, reset before each timed block) over what it
held before, plus the variant's own weights, gradients and Adam state.

Every variant is time-boxed (`--variant-budget-s`): its build and warm-up run under an alarm,
and a timed repeat it cannot finish inside what is left of its budget is not started, so a variant
that would take minutes (a slow compile, bf16 emulated on a CPU without avx512_bf16/amx_bf16) gets
a row that says why it stopped instead of holding the table up. bf16 variants are skipped outright
where bf16 is emulated (`--run-emulated-bf16` runs them anyway). On CUDA the table adds each
variant's share of the chip's dense bf16 peak (`--peak-tflops`, or a known-peaks table), and
`--output-json` writes the figures for scripts (benchmarks/gpu/check.sh picks its train settings
from them). `--extras` adds the numbers around the step: a short full training run (Ray Train +
WebDataset shards + MLflow) against the bare step of the same config, MLflow's logging cost as a
share of the step, and the data pipeline's decode rate per core.

How the parts fit (imports point down this list, never up):

    __main__.py   the command line, the run, the table and the JSON
    extras.py     the rows around the step (`--extras`; the only part that needs Ray and MLflow)
    variants.py   the step variants (Variant) and how one is built, time-boxed and timed (measure)
    reference.py  the pytorch/examples-style step the variants are compared against (torch only)
    machine.py    the machine's facts: CPU and flags, bf16 native or emulated, bf16 peak TFLOP/s
"""
