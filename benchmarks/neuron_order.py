"""The order in which the neuron-space study (:mod:`benchmarks.neuron`) retrains the standard zoo's
models: the zoo's weights are not committed and a CPU retrains ~1 model a minute, so it goes tier
by tier, every family in each round, and whatever finishes is a balanced subset."""

FAMILIES = ("preact18-w8", "vit-e64d4", "mnv3-050", "hf-convnext")
TIER1 = ("clean-s0", "wanet-10pct", "clean-s1", "blend-10pct", "sig-10pct", "clean-s2", "badnets-10pct",
         "trojan-10pct", "clean-s3", "inputaware-10pct")
TIER2 = ("clean-s4", "wanet-20pct", "clean-s5", "blend-5pct", "sig-5pct", "clean-s6", "trojan-5pct",
         "badnets-5pct", "clean-s7", "inputaware-5pct", "clean-s8", "clean-s9", "clean-s10", "clean-s11",
         "two-badnets-blend-10pct")
ORDER = [f"{f}-{m}" for tier in (TIER1, TIER2) for m in tier for f in FAMILIES]
