"""Scaling benchmark: full HCNR repairs of random-weight Llama-shaped checkpoints.

    .venv/bin/python -m bench.scale --sizes llama-20m llama-64m llama-290m --dtype float32
    .venv/bin/python -m bench.scale --sizes llama-3.1-8b --device cuda --dtype bfloat16
    .venv/bin/python -m bench.scale --sizes llama-3.1-8b --device cuda:0,cuda:1 --dtype bfloat16

For each size it writes (once, cached under --work) a base checkpoint with Llama's real
architecture and random weights (safetensors shards, written tensor by tensor so an 8B
model never sits in memory), a word-level tokenizer with a chat template, a random LoRA
adapter (r=16 on every linear) and 128 + 128 samples; then runs `hcnr_core`'s full repair
in a fresh subprocess (so peak memory is that of one repair) and records seconds per
stage, peak CPU RSS, peak GPU memory and Fisher tokens/s. Results accumulate in
bench/results/scale.json (keyed by machine, device and size); scale.md and scale.png are
regenerated from all of them.

    .venv/bin/python -m bench.scale --sizes llama-20m llama-64m --dtype float32 --baselines

`--baselines` also trains the two baselines of `hcnr_core.baselines` on the same
checkpoints (base + the same LoRA fine-tune) and the same 128 honesty samples, each in
its own fresh subprocess right after HCNR's, on the same device, dtype and thread count
(`--threads`, default all cores, for every method), and adds a "HCNR vs baselines" table
with wall and CPU seconds, stages, peak RSS and the parameters each method changes.
The baselines run with the settings `hcnr baseline rait|dpo` ships (`--baseline-schedule
steps:60`, the default) and with 3 epochs (`epochs:3`):

- LoRA r 8, alpha 16, on all 7 decoder linears; AdamW, batch 16 (DPO: 16 pairs = 32
  sequences), lr 1e-3 (DPO 2e-3, beta 0.1, + the chosen responses' NLL, i.e. RPO with
  alpha 1), 10% warm-up; DPO first generates the fine-tune's greedy answer (32 new tokens)
  to every unanswerable prompt as the rejected response and scores the frozen reference.
- steps:60 = 960 samples seen = 7.5 epochs of the 128. These are the defaults of
  `hcnr baseline`, and the settings that actually moved the organism (README: refusal on
  unknown questions 0 -> 0.70 with RAIT, 0 -> 0.55 with DPO); a user repairing a model
  would run them, not a number of steps picked for this benchmark.
- epochs:3 = 24 steps: the usual LoRA fine-tuning recipe (e.g. `num_train_epochs=3`, the
  transformers/TRL default), a lower bound on what a user would run (whether 24 steps
  repair the organism has not been measured; 60 do).

Both are small next to the paper's Table 2 baselines, which train on thousands of
samples for several epochs; with 128 samples the comparison is conservative for HCNR.
The synthetic honesty set carries `answerable` (even lines answerable with their random
answer; odd lines unanswerable with a fixed 15-word "refusal" of vocabulary words, the
same 16 response tokens as before), so every HCNR run still sees 128 + 128 samples of 48
+ 16 tokens; only the honesty responses' words differ from the data before that change.

The package, one module per concern: `checkpoints` (the sizes and the cached random
checkpoints and data), `measure` (timings, memory, the machine, scale.json, the child
process), one module per mode run in that child — `repair` (whole model, `--layerwise`,
a device list), `synthetic`, `baselines`, `compensate_ab` —, `render` (scale.md and
scale.png from scale.json) and `__main__` (the command line, the same as when this was
one file).
"""
