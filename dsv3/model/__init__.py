"""The DeepSeek-V3 network as a transformers model (model_type "dsv3").

Importing this package registers DSV3Config with AutoConfig and the models with AutoModel,
AutoModelForCausalLM and AutoModelForSequenceClassification.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from dsv3.model.model import (
    DSV3CausalLMOutput,
    DSV3Config,
    DSV3ForCausalLM,
    DSV3ForSequenceClassification,
    DSV3Model,
    count_parameters,
)

AutoConfig.register("dsv3", DSV3Config, exist_ok=True)
AutoModel.register(DSV3Config, DSV3Model, exist_ok=True)
AutoModelForCausalLM.register(DSV3Config, DSV3ForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(DSV3Config, DSV3ForSequenceClassification, exist_ok=True)

__all__ = [
    "DSV3CausalLMOutput",
    "DSV3Config",
    "DSV3ForCausalLM",
    "DSV3ForSequenceClassification",
    "DSV3Model",
    "count_parameters",
]
