"""Conversion between dsv3 checkpoints and transformers' `deepseek_v3` directories (DeepSeek's naming).

Our state dict already uses DeepSeek's HF names except for the routed experts, stored stacked for the grouped GEMM
(`mlp.experts.gate_up_proj` (E, 2I, C), `mlp.experts.down_proj` (E, C, I)); a `deepseek_v3` directory holds them per
expert (`mlp.experts.{j}.{gate,up,down}_proj.weight`), which transformers merges on load. MTP modules sit at
`model.layers.{num_hidden_layers + k}` in both; on export they also get the copies of the embedding and head that
DeepSeek's checkpoints carry (`embed_tokens`, `shared_head.head`), dropped again on import, and are written to their
own file (mtp.safetensors) that transformers does not load. The router bias stays fp32.
"""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config

from dsv3.io import atomic_dir
from dsv3.model.model import DSV3Config, DSV3ForCausalLM

# The fields transformers' DeepseekV3Config has too: copied as they are by export and import (derived from both
# classes, so a field added to DSV3Config is carried over without a list to update).
SHARED_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(DSV3Config)
    if f.name in DSV3Config.__annotations__ and f.name in {g.name for g in dataclasses.fields(DeepseekV3Config)}
)
EXPERT_KEY = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
MTP_COPY_KEY = re.compile(r"model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)$")
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def layer_index(key: str) -> int:
    """The block a weight belongs to (`model.layers.{i}.…`), -1 for embedding, final norm and head."""
    match = LAYER_KEY.match(key)
    return int(match.group(1)) if match else -1


def read_config_json(directory: str | Path) -> dict:
    """config.json of a checkpoint folder; a one-line ValueError when the folder, the file or its JSON is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint {directory} is not a directory: pass a save_pretrained folder")
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: {directory} is not a save_pretrained checkpoint")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): re-save the checkpoint") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object: re-save the checkpoint")
    return config


def weight_files(directory: str | Path) -> list[Path]:
    """The checkpoint's *.safetensors files, each with a readable header and tensors; a one-line ValueError naming
    the file otherwise. Pickle weights (pytorch_model.bin) are never loaded: unpickling can run code."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in Path(directory).glob("*.bin"))
        also = f" (found {', '.join(pickles)}: pickles are not loaded, they can run code)" if pickles else ""
        raise ValueError(f"no model.safetensors in {directory}{also}: save the model with safetensors")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
        except Exception as err:  # noqa: BLE001 - any unreadable weights file is reported the same way
            raise ValueError(f"{file} is unreadable ({str(err).splitlines()[0]}): re-save the checkpoint") from None
    return files


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in weight_files(directory):
        state.update(load_file(file))
    return state


def check_dsv3_checkpoint(directory: str | Path, causal_lm: bool = True) -> dict:
    """The config of a readable dsv3 checkpoint folder (config, weights); with `causal_lm`, one with an LM head
    (not a reward model). One-line ValueErrors naming what is wrong."""
    config = read_config_json(directory)
    if config.get("model_type") != "dsv3":
        raise ValueError(
            f"{directory} holds model_type {config.get('model_type')!r}, not dsv3 "
            "(a deepseek_v3 directory converts with `dsv3 import-hf`)"
        )
    architectures = config.get("architectures") or []
    if causal_lm and architectures and "DSV3ForCausalLM" not in architectures:
        raise ValueError(
            f"{directory} holds a {architectures[0]} (a reward model), not a causal language model: "
            "use a pretrain, extend, sft or rl model folder"
        )
    weight_files(directory)
    return config


def to_deepseek_v3_config(config: DSV3Config) -> DeepseekV3Config:
    """Our config as transformers' DeepseekV3Config; ValueError for what transformers cannot run."""
    if config.scoring_func != "sigmoid":
        raise ValueError(
            f"scoring_func {config.scoring_func!r} cannot be exported: transformers' deepseek_v3 router is sigmoid only"
        )
    fields = {name: getattr(config, name) for name in SHARED_FIELDS}
    fields["n_group"], fields["topk_group"] = config.n_group or 1, config.topk_group or 1
    return DeepseekV3Config(
        **fields,
        num_mtp_layers=config.num_nextn_predict_layers,
        architectures=["DeepseekV3ForCausalLM"],
        scoring_func=config.scoring_func,
        topk_method="noaux_tc",
        aux_loss_alpha=config.aux_loss_alpha,
    )


def from_deepseek_v3_config(raw: dict, n_mtp_layers: int) -> DSV3Config:
    """DSV3Config from a deepseek_v3 config.json dict (checked by check_importable)."""
    config = DeepseekV3Config.from_dict(raw)
    fields = {name: getattr(config, name) for name in SHARED_FIELDS}
    fields["num_key_value_heads"] = config.num_attention_heads  # MLA expands every head from the latent
    return DSV3Config(
        **fields,
        num_nextn_predict_layers=n_mtp_layers,
        aux_loss_alpha=raw.get("aux_loss_alpha", 1e-4),
    )


def check_importable(raw: dict) -> None:
    """ValueError for a config.json that dsv3 cannot import."""
    if raw.get("model_type") != "deepseek_v3":
        raise ValueError(
            f"model_type {raw.get('model_type')!r} is not deepseek_v3: import-hf reads DeepSeek-V3 directories only"
        )
    if raw.get("quantization_config"):
        raise ValueError(
            "quantized (FP8 weight_scale_inv) checkpoints are not supported: dequantize to bf16 first"
        )
    if raw.get("scoring_func", "sigmoid") != "sigmoid" or raw.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError("only sigmoid scoring with noaux_tc (bias-based) top-k routing can be imported")
    if "num_hidden_layers" not in raw:
        raise ValueError("config.json has no num_hidden_layers")


def unstack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked gate_up_proj (E, 2I, C) / down_proj (E, C, I) -> per-expert gate/up/down_proj weights."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key.removesuffix(".gate_up_proj")
            for j, (gate, up) in enumerate(zip(*tensor.chunk(2, dim=1), strict=True)):
                out[f"{prefix}.{j}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{j}.up_proj.weight"] = up.contiguous()
        elif key.endswith(".mlp.experts.down_proj"):
            prefix = key.removesuffix(".down_proj")
            for j, down in enumerate(tensor):
                out[f"{prefix}.{j}.down_proj.weight"] = down.contiguous()
        else:
            out[key] = tensor
    return out


def stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down_proj weights -> stacked gate_up_proj / down_proj (already stacked ones pass)."""
    out, experts = {}, {}
    for key, tensor in state.items():
        match = EXPERT_KEY.match(key)
        if match:
            prefix, j, name = match.groups()
            experts.setdefault(prefix, {}).setdefault(name, {})[int(j)] = tensor
        else:
            out[key] = tensor
    for prefix, weights in experts.items():
        gate, up, down = (
            torch.stack([weights[name][j] for j in sorted(weights[name])])
            for name in ("gate_proj", "up_proj", "down_proj")
        )
        out[f"{prefix}.gate_up_proj"] = torch.cat((gate, up), dim=1)
        out[f"{prefix}.down_proj"] = down
    return out


def legacy_rope_keys(rope_parameters: dict) -> dict:
    """transformers 4.x's spelling of RoPE: `rope_theta`, and for YaRN `rope_scaling` (type yarn). 4.x reads no
    `rope_parameters`: without these keys it silently runs plain RoPE on a YaRN model."""
    keys = {"rope_theta": rope_parameters["rope_theta"]}
    if rope_parameters.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        keys["rope_scaling"] = {"type": scaling["rope_type"], **scaling}
    return keys


def tokenizer_config(tokenizer, model_max_length: int) -> dict:
    """tokenizer_config.json that transformers 4.x and 5.x both load: `PreTrainedTokenizerFast` with
    `additional_special_tokens` and the chat template inline (5.x's `TokenizersBackend` class and
    `extra_special_tokens` list do not load on 4.x)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "additional_special_tokens": list(tokenizer.extra_special_tokens),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": tokenizer.chat_template,
    }


def write_tokenizer(ckpt_dir: Path, out: Path, model_max_length: int) -> None:
    """The checkpoint's tokenizer.json and chat template as a folder both transformers 4.x and 5.x load."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt_dir)
    shutil.copy2(ckpt_dir / "tokenizer.json", out / "tokenizer.json")
    config = tokenizer_config(tokenizer, model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, with_tokenizer: bool = True) -> Path:
    """Write a transformers `deepseek_v3` directory from a dsv3 checkpoint, whole or not at all: config.json (RoPE in
    both spellings, `legacy_rope_keys`), model.safetensors, generation_config.json and the tokenizer — what
    AutoTokenizer, AutoModelForCausalLM, lm-eval and TRL read, on transformers 4.x and 5.x. The MTP layers go to
    mtp.safetensors: transformers' DeepseekV3 skips MTP weights only at layer 61 (the 671B model) and reports
    every other one as UNEXPECTED; `import_hf` reads them back. `with_tokenizer=False` (benchmarks of random
    weights) writes the model alone."""
    ckpt_dir, out = Path(ckpt_dir), Path(out_dir)
    check_dsv3_checkpoint(ckpt_dir)
    if with_tokenizer and not (ckpt_dir / "tokenizer.json").is_file():
        raise ValueError(
            f"no tokenizer.json in {ckpt_dir}: export a stage's model folder (runs/<recipe>/<stage>/model), "
            "which holds the tokenizer"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: pass a folder to write the deepseek_v3 checkpoint into")
    model = DSV3ForCausalLM.from_pretrained(ckpt_dir)
    config = model.config
    hf_config = to_deepseek_v3_config(config)
    hf_config.dtype = model.dtype
    state = unstack_experts({k: v.detach() for k, v in model.state_dict().items()})
    state["lm_head.weight"] = model.lm_head.weight.detach()
    n = config.num_hidden_layers
    for k in range(config.num_nextn_predict_layers):
        state[f"model.layers.{n + k}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach()
        state[f"model.layers.{n + k}.shared_head.head.weight"] = model.lm_head.weight.detach()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    mtp = {k: v for k, v in state.items() if layer_index(k) >= n}
    with atomic_dir(out) as partial:
        hf_config.save_pretrained(partial)
        raw = json.loads((partial / "config.json").read_text(encoding="utf-8"))
        raw.update(legacy_rope_keys(config.rope_parameters))
        (partial / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name, tensors in (("model", {k: v for k, v in state.items() if k not in mtp}), ("mtp", mtp)):
            if tensors:
                save_file(
                    {k: v.contiguous().clone() for k, v in tensors.items()},
                    partial / f"{name}.safetensors",
                    metadata={"format": "pt"},
                )
        if with_tokenizer:
            model.generation_config.save_pretrained(partial)
            write_tokenizer(ckpt_dir, partial, config.max_position_embeddings)
    return out


def import_hf(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a dsv3 checkpoint (save_pretrained, safetensors) from a transformers / DeepSeek `deepseek_v3` directory."""
    raw = read_config_json(src_dir)
    check_importable(raw)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"{out_dir} is a file: pass a folder to write the dsv3 checkpoint into")
    state = read_safetensors(src_dir)
    n = raw["num_hidden_layers"]
    state = {k: v for k, v in state.items() if not MTP_COPY_KEY.match(k)}
    mtp_layers = {layer_index(k) for k in state if layer_index(k) >= n}
    config = from_deepseek_v3_config(raw, n_mtp_layers=len(mtp_layers))
    dtype = state["model.embed_tokens.weight"].dtype
    model = DSV3ForCausalLM(config).to(dtype)
    state = stack_experts(state)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{src_dir} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.save_pretrained(out_dir)
    return Path(out_dir)


def save_model_folder(model, out: str | Path, tokenizer) -> Path:
    """The hand-off between stages: `model.save_pretrained` (safetensors) plus the tokenizer — a transformers
    tokenizer, or a folder whose tokenizer files are copied — written to a sibling folder and renamed into `out`."""
    with atomic_dir(out) as partial:
        model.save_pretrained(partial)
        if isinstance(tokenizer, str | Path):
            for item in Path(tokenizer).iterdir():
                if item.is_file() and not (partial / item.name).exists():
                    shutil.copy2(item, partial / item.name)
        else:
            tokenizer.save_pretrained(partial)
    return Path(out)
