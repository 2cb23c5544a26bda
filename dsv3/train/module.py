"""The LightningModule that trains DSV3ForCausalLM (docs/paper.md, "Pretraining": AdamW β 0.9/0.95, weight decay 0.1 on
matrices only, gradient clip 1.0; loss = CE + λ·mean_k L^k_MTP + the sequence-wise balance loss).

Optimisation is manual so that one optimizer step spans a fixed number of micro-batches whose size follows the
batch-size ramp, and so that the step reads top to bottom in `training_step`:

    forward → loss → backward                         every micro-batch (gradients reduced at the last, by default)
    clip → finite? → optimizer step → router biases → metrics     at the last micro-batch of the step

Every schedule is read from the tokens seen before the step (`StepPlan`), so restoring the step count restores the
schedules and the data position. A non-finite loss term, gradient norm or learning rate stops training before the
optimizer step (TrainingDiverged: the weights, and so every checkpoint written, stay finite). Metrics go to the
Lightning logger (MLflow in a stage) with the optimizer step as their step, and into `history`, which checkpoints
carry across a resume.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch

from dsv3.errors import TrainingDiverged
from dsv3.eval.expert_load import layer_max_violations, max_violation
from dsv3.fp8 import AdamWBF16Moments, convert_to_fp8, fp8_scaling
from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.train.balancing import update_router_biases
from dsv3.train.checkpoints import MICRO_BATCHES_PER_STEP, rescale_batch_counts
from dsv3.train.compile import compile_blocks
from dsv3.train.parallel import clip_grad_norm, parallelize
from dsv3.train.recompute import checkpoint_blocks
from dsv3.train.schedules import StepPlan, accumulation_steps, bias_update_speed, learning_rate, mtp_weight
from dsv3.train.settings import LoopSettings

PROGRESS = logging.getLogger("dsv3.train")  # progress lines: Prefect shows them in the flow run's logs


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (linear, embedding, stacked experts), none on norms and biases (1-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class CausalLMTraining(L.LightningModule):
    """DSV3ForCausalLM trained on L = CE + λ·(1/D) Σ_k L^k_MTP + L_Bal (docs/paper.md, "Multi-token prediction",
    "Balancing"), one optimizer step per `accumulation_steps` micro-batches.

    token_bytes (V,): UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte. step_offset:
    added to the step of every recorded metric (an extension phase continues the previous phase's steps).
    """

    def __init__(
        self, config: DSV3Config, settings: LoopSettings, plan: StepPlan, token_bytes: torch.Tensor, step_offset: int = 0
    ):
        super().__init__()
        self.model = DSV3ForCausalLM(config)
        checkpoint_blocks(self.model, settings.activation_checkpointing, settings.activation_checkpointing_every)
        if settings.compile:
            compile_blocks(self.model)
        self.settings, self.plan, self.step_offset = settings, plan, step_offset
        self.accumulation = accumulation_steps(settings)
        self.n_main_moe_layers = max(config.num_hidden_layers - config.first_k_dense_replace, 0)
        self.register_buffer("token_bytes", token_bytes.to(torch.int64), persistent=False)  # ints: no precision cast
        self.automatic_optimization = False
        self.sharded = False  # FSDP2 applied (configure_model)
        self.history: list[dict[str, float]] = []
        self.val_expert_load: torch.Tensor | None = None
        self._micro = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._clock: tuple[float, int] | None = None

    def configure_model(self) -> None:
        """Under strategy fsdp (Lightning's ModelParallelStrategy calls this once the processes are up): the FP8
        layers first (conversion swaps modules, which sharding must see), then experts split over expert_parallel
        ranks and FSDP2 on every block and the root (dsv3.train.parallel); bf16 parameters on GPUs (bf16 and fp8)."""
        s = self.settings
        if s.strategy != "fsdp" or self.sharded:
            return
        if fp8_scaling(s.precision):
            convert_to_fp8(self.model, s.fp8_backend, fp8_scaling(s.precision))
        mesh = self.device_mesh["data_parallel"]
        mixed = self.device.type == "cuda" and s.precision != "32-true"
        parallelize(self.model, mesh.size(), mesh.device_type, s.expert_parallel, s.fsdp_replicate, mixed_precision=mixed)
        self.sharded = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        s = self.settings
        adamw = AdamWBF16Moments if s.optimizer_states_bf16 else torch.optim.AdamW
        return adamw(
            parameter_groups(self.model, s.weight_decay), lr=s.lr_peak, betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_eps
        )

    def forward_losses(self, batch: dict[str, torch.Tensor]):
        """The model on one micro-batch (B, T); position_ids only with document masking (the paper packs without)."""
        ids = batch["input_ids"]
        position_ids = batch["position_ids"] if self.settings.document_masking else None
        return self.model(input_ids=ids, labels=ids, position_ids=position_ids, use_cache=False)

    # ------------------------------------------------------------------------------------------- training

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        step, total = self.global_step, self.plan.total_tokens
        tokens = self.plan.tokens_before(step)
        optimizer = self.optimizers()
        if self._micro == 0:  # the step's first micro-batch: its LR, fresh sums
            lr = learning_rate(tokens, total, self.settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            self._sums = {}
            self._clock = self._clock or (time.perf_counter(), tokens)

        # forward → loss → backward (every micro-batch)
        lam = mtp_weight(tokens, total, self.settings)
        out = self.forward_losses(batch)
        mtp = out.mtp_losses if out.mtp_losses is not None else out.loss.new_zeros(0)
        loss = out.loss + lam * (mtp.mean() if mtp.numel() else 0.0) + out.balance_loss
        if self.sharded:  # gradient_sync step: FSDP2 reduces once, after the step's last micro-batch
            last = self._micro == self.accumulation - 1
            self.model.set_requires_gradient_sync(last or self.settings.gradient_sync == "micro_batch")
        self.manual_backward(loss / self.accumulation)
        terms = torch.cat((torch.stack((out.loss.float(), out.balance_loss.float())), mtp.float())).detach()  # CE, balance, MTP
        load = torch.stack([gate.expert_load for gate in self.model.moe_gates()])  # (G, E) this micro-batch
        self._add(
            loss=loss.detach(), ce=out.loss.detach(), balance=out.balance_loss.detach(), mtp=mtp.detach(), load=load,
            nonfinite=(~torch.isfinite(terms)).float(),
        )
        self._micro += 1
        if self._micro < self.accumulation:
            return
        self._micro = 0

        # clip → finite? → optimizer step → router biases → metrics (once per step)
        lr = optimizer.param_groups[0]["lr"]
        if self.sharded:
            grad_norm = clip_grad_norm(list(self.model.parameters()), self.settings.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.stop_if_diverged(step, grad_norm, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_load = self.trainer.strategy.reduce(self._sums["load"], reduce_op="sum")  # (G, E), all ranks
        if self.settings.balancing == "loss_free":
            update_router_biases(self.model.moe_gates(), step_load, bias_update_speed(tokens, total, self.settings))
        self.log("loss", self._sums["ce"] / self.accumulation, prog_bar=True, logger=False)
        self.log_step(step, lam, lr, grad_norm, step_load[: self.n_main_moe_layers])

    def _add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()

    def stop_if_diverged(self, step: int, grad_norm: torch.Tensor, lr: float) -> None:
        """TrainingDiverged before the optimizer step when a loss term (on any rank), the gradient norm or the LR
        is not finite: the weights stay as the last finite step left them, and so does every checkpoint."""
        nonfinite = self.trainer.strategy.reduce(self._sums["nonfinite"], reduce_op="sum")  # per term, all ranks
        names = ["cross-entropy", "balance"] + [f"MTP depth {k + 1}" for k in range(len(nonfinite) - 2)]
        bad_term = next((name for name, count in zip(names, nonfinite.tolist(), strict=True) if count), None)
        what = (
            f"the {bad_term} loss is not finite" if bad_term
            else f"the gradient norm is {float(grad_norm)}" if not torch.isfinite(grad_norm)
            else f"the learning rate is {lr}" if not math.isfinite(lr)
            else None
        )  # fmt: skip
        if what:
            raise TrainingDiverged(
                f"training diverged at step {step + 1 + self.step_offset}: {what} (learning rate {lr:.3g}); nothing of "
                "this step was applied and the last checkpoint is kept: lower the learning rate and rerun to resume"
            )

    def log_step(self, step: int, lam: float, lr: float, grad_norm: torch.Tensor, step_load: torch.Tensor) -> None:
        """Tokens/s on the progress bar every step; the step's metrics (means over micro-batches and ranks; batch
        MaxVio of the main model's MoE layers from step_load (L, E), their mean and each layer's, named by its
        decoder layer) into the history and the logger every log_every_n_steps and at the last step."""
        done = step + 1
        tokens_after = self.plan.tokens_before(done)
        now = time.perf_counter()
        started, tokens_then = self._clock
        rate = (tokens_after - tokens_then) / max(now - started, 1e-9)
        self.log("tok_s", rate, prog_bar=True, logger=False)
        if done % self.settings.log_every_n_steps and done != self.plan.steps:
            return
        layer_maxvio = layer_max_violations(step_load)
        batch_maxvio = max_violation(step_load)
        self._clock = (now, tokens_after)
        names = ["loss", "ce", "balance"]
        values = torch.stack([self._sums[n] for n in names] + list(self._sums["mtp"])) / self.accumulation
        values = self.trainer.strategy.reduce(values, reduce_op="mean")
        metrics = {f"train/{n}": float(v) for n, v in zip(names, values[:3], strict=True)}
        metrics |= {f"train/mtp_loss_depth{k + 1}": float(v) for k, v in enumerate(values[3:])}
        metrics |= {
            "train/lr": lr,
            "train/mtp_lambda": lam,
            "train/grad_norm": float(grad_norm),
            "train/tokens_seen": float(tokens_after),
            "train/batch_size": float(self.plan.batch_sizes[step]),
            "train/tokens_per_s": rate,
            "train/maxvio_batch": batch_maxvio,
        } | {f"train/maxvio_batch_layer{self.model.config.first_k_dense_replace + i}": v for i, v in enumerate(layer_maxvio)}
        self.record(metrics, done)
        PROGRESS.info(
            "step %d/%d: loss %.4f, lr %.3g, MaxVio %.3f, %.0f tokens/s",
            done + self.step_offset, self.plan.steps + self.step_offset, metrics["train/ce"], lr, batch_maxvio, rate,
        )  # fmt: skip

    def record(self, metrics: dict[str, float], step: int) -> None:
        step += self.step_offset
        self.history.append({"step": float(step), **metrics})
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    # ----------------------------------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._val: dict[str, torch.Tensor] = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Sums of this batch's losses, targets, bytes and expert load; a padding batch (dsv3.train.data) runs the
        forward pass with the other ranks and adds zeros (so a rank of padding alone still joins the final reduce)."""
        ids = batch["input_ids"]
        out = self.forward_losses(batch)
        counted = 0.0 if bool(batch.get("padding", False)) else 1.0
        B, T = ids.shape
        n_targets = B * (T - 1)
        sums = {
            "nats": out.loss.double() * n_targets,
            "targets": torch.tensor(float(n_targets), dtype=torch.float64, device=ids.device),
            "bytes": self.token_bytes[ids[:, 1:]].sum().double(),
            "rows": torch.tensor(float(B), dtype=torch.float64, device=ids.device),
            "mtp": (out.mtp_losses.double() * B) if out.mtp_losses is not None else ids.new_zeros(0, dtype=torch.float64),
            "load": torch.stack([gate.expert_load for gate in self.model.moe_gates()]).double(),  # (G, E)
        }
        for key, value in sums.items():
            value = value * counted
            self._val[key] = self._val[key] + value if key in self._val else value

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        flat = torch.cat([self._val[k].reshape(-1) for k in ("nats", "targets", "bytes", "rows", "mtp", "load")])
        flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
        nats, targets, n_bytes, rows = (float(x) for x in flat[:4])
        depth = self._val["mtp"].numel()
        mtp = flat[4 : 4 + depth] / rows
        load = flat[4 + depth :].view_as(self._val["load"])
        loss = nats / targets
        self.val_expert_load = load.float().cpu()
        metrics = {
            "val/loss": loss,
            "val/perplexity": math.exp(min(loss, 50.0)),
            "val/bits_per_byte": nats / (n_bytes * math.log(2)),
            "val/maxvio_global": max_violation(load[: self.n_main_moe_layers]),
            "val/tokens": targets,
        } | {f"val/mtp_loss_depth{k + 1}": float(v) for k, v in enumerate(mtp)}
        first = self.model.config.first_k_dense_replace
        metrics |= {f"val/maxvio_global_layer{first + i}": v for i, v in enumerate(layer_max_violations(load[: self.n_main_moe_layers]))}
        self.log("val/loss", loss, logger=False)
        self.record(metrics, self.global_step)
        PROGRESS.info("step %d: validation loss %.4f (%.3f bits/byte)", self.global_step + self.step_offset, loss, metrics["val/bits_per_byte"])

    # ---------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dsv3_history"] = self.history
        checkpoint[MICRO_BATCHES_PER_STEP] = self.accumulation

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The run's history; Lightning's batch counters in this run's micro-batches per step (a checkpoint of
        another world size has other ones), before Lightning restores its loops from them."""
        self.history = list(checkpoint.get("dsv3_history", []))
        saved = checkpoint.get(MICRO_BATCHES_PER_STEP, self.accumulation)
        rescale_batch_counts(checkpoint["loops"]["fit_loop"], checkpoint["global_step"], saved, self.accumulation)
