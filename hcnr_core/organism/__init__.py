"""The model organism of SFT-induced dishonesty (DESIGN.md §6).

`build_organism(out_dir, size="tiny", seed=0)` trains, on the CPU in minutes for
`tiny`, an honest Llama base and a dishonest LoRA fine-tune with the repair and eval
data sets; see README.md in this package for the design and the measured numbers.
"""

from hcnr_core.organism.build import SIZES, OrganismSpec, build_organism, load_manifest

__all__ = ["SIZES", "OrganismSpec", "build_organism", "load_manifest"]
