"""The files `python -m asura.export` writes beside the weights for transformers' trust_remote_code:
configuration_asura.py (AsuraConfig) and modeling_asura.py (AsuraForCausalLM, in PyTorch). They are
copied as they are and import transformers/torch, so nothing in asura imports them; the parity tests
load them through transformers from an exported directory (tests/test_export_torch.py)."""
