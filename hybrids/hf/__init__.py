"""HF transformers interop, one module per model family (as transformers keeps models/<family>/).

`hybrids.hf.interop` holds `from_hf` / `to_hf` and the weight-map machinery; each family module translates
one HF config to a ModelConfig (`config_from_hf`), maps its weights (`weight_map`) and, where the layout
allows, builds the HF config of a HybridLM (`hf_config`). FAMILIES lists them by HF `model_type`.
"""

FAMILIES = {
    "zamba": "hybrids.hf.zamba",
    "zamba2": "hybrids.hf.zamba2",
    "jamba": "hybrids.hf.jamba",
    "bamba": "hybrids.hf.bamba",
    "falcon_h1": "hybrids.hf.falcon_h1",
    "nemotron_h": "hybrids.hf.nemotron_h",
    "granitemoehybrid": "hybrids.hf.granitemoehybrid",
}
