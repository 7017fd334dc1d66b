"""Compress MoE models from their recorded routing: expert pruning, expert merging and per-expert
mixed-precision quantization, for moekit's LM and every family `moekit.from_hf` loads.

- `calibrate`: one recording pass collecting per-expert routing and output statistics.
- `scores`: the papers' saliencies as pure functions of those statistics.
- `prune`, `merge`: which experts to keep or fuse; `surgery` rewrites router and experts together;
  `padding` stores different per-layer counts in one-count configs.
- `premoe`: PreMoe's per-domain masks and their retrieval for a prompt at inference.
- `quantize`: group-wise RTN and GPTQ per expert, MC-MoE's bit allocation as an integer program.
- `recipe`, `pipeline`, `cli`: `moekit compress SRC --recipe R --calib ... --out DST`.
"""
