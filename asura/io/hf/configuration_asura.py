"""AsuraConfig: every flag of asura's ModelConfig that changes the forward pass (written by
`python -m asura.export`; loaded by transformers with trust_remote_code=True).

`depth` is the loop depth a forward pass runs when none is given (the run's model.iterations);
`model(..., depth=n)` and `model.generate(..., depth=n)` choose another. Depths past max_iterations
reuse per-iteration parameters as `extrapolation` says: none (refused) | last | cycle, as in asura.
`asura_config` holds the run's whole YAML config, so `asura.io.export.load_export` rebuilds the
exact asura model from this directory.
"""

from transformers import PretrainedConfig


class AsuraConfig(PretrainedConfig):
    model_type = "asura"

    def __init__(
        self,
        vocab_size=256,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        intermediate_size=512,
        num_hidden_layers=2,
        depth=3,
        max_iterations=3,
        extrapolation="none",
        mlp="gelu",
        norm="layernorm",
        norm_eps=1e-5,
        injection="projconcat",
        loop_start="embed",
        iter_norm=True,
        post_norm=True,
        adapter="none",
        adapter_rank=4,
        adapter_rank2=4,
        adapter_gamma=1.0,
        adapter_targets=("q", "k", "v", "o", "up", "down"),
        exit_gate=False,
        qk_norm=True,
        position="rope",
        rope_theta=10000.0,
        max_position_embeddings=64,
        initializer_range=0.02,
        tie_word_embeddings=True,
        compute_dtype="float32",
        asura_config="",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers  # blocks in the shared stack (one iteration)
        self.depth = depth
        self.max_iterations = max_iterations
        self.extrapolation = extrapolation
        self.mlp = mlp
        self.norm = norm
        self.norm_eps = norm_eps
        self.injection = injection
        self.loop_start = loop_start
        self.iter_norm = iter_norm
        self.post_norm = post_norm
        self.adapter = adapter
        self.adapter_rank = adapter_rank
        self.adapter_rank2 = adapter_rank2
        self.adapter_gamma = adapter_gamma
        self.adapter_targets = list(adapter_targets)
        self.exit_gate = exit_gate
        self.qk_norm = qk_norm
        self.position = position
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.compute_dtype = compute_dtype  # asura's model.dtype, whatever dtype the weights load in
        self.asura_config = asura_config
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
