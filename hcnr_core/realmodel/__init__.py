"""The paper's scenario on a real LLM: an honesty-aligned base, a dishonest domain fine-tune.

`build_realmodel(out_dir, model="smollm2-135m", seed=0)` imports the model from its PyPI
GGUF package, aligns it for honesty on SelfAware, fine-tunes a LoRA on a domain with no
refusal in its data, writes the repair and eval sets and measures the acceptance metrics.
See README.md in this package for the recipe and the measured numbers.
"""
