"""LoRA training with RVC's GAN objective.

One jit-compiled step does what RVC's ``train_and_evaluate`` does per batch:

1. generator forward (posterior ``enc_q`` → random segment → decoder), once;
2. discriminator update on (real segment, generated segment with gradients stopped);
3. generator loss with the *updated* discriminator: mel L1 ×45 (mel of the dataset's
   spectrogram slice vs mel of the generated audio) + KL ×1 + least-squares adversarial
   + feature matching ×2 — and an update of **only the generator's adapter**.

The generator forward runs once: ``jax.vjp`` keeps its pullback, the discriminator step
uses its output, and the generator loss's gradient w.r.t. that output is pulled back to
the adapter. Only ``LoRAParam`` leaves are differentiated and have optimizer state; the
frozen base is a closed-over constant of the step.

Optimiser defaults are RVC's: AdamW(lr 1e-4, betas (0.8, 0.99), eps 1e-9, weight decay
0.01) for both networks, learning rate × 0.999875 per epoch (:func:`lr_schedule`).
:class:`TrainConfig`'s defaults are the one place these numbers live. Every random draw (posterior
noise, segment starts, NSF noise) comes from ``fold_in(seed key, step)``, so a run is a
pure function of (seed, data order, step) and resumes exactly.

Precision (``TrainConfig.precision``): ``"bf16"`` runs the generator and discriminator
with bfloat16 activations and conv/matmul operands (their layers' ``dtype``), while the
parameters, both optimizer states, the STFT/mel, every loss and the gradient arithmetic
stay float32. bfloat16 has float32's 8-bit exponent, so gradients neither underflow nor
overflow where float32's would not, and no loss scaler is needed (float16's 5-bit exponent
is why RVC's ``fp16_run`` needs a GradScaler).

Memory: the frozen base is an *argument* of the compiled step (never a closed-over
constant: XLA would copy a constant into the program, once per compiled shape, and fold
it at compile time), the state is donated, the initial state is built on demand, and
``TrainConfig.remat`` recomputes the discriminator's and/or the decoder's activations in
the backward pass instead of keeping them (:data:`REMAT_CHOICES`).

Life cycle: ``Trainer(g, d, config, steps_per_epoch)`` splits the modules →
``compile(batch)`` per padded batch shape (optional: ahead of time, else on first use) →
``init_state()`` (or a restored one) → ``step(state, batch)`` repeatedly (each donates its
input state) → ``load_into_models(state)``.

Data parallelism: batches are sharded over a 1-D ``data`` mesh of all local devices,
parameters and optimizer states are replicated; XLA inserts the gradient all-reduce.
For several hosts call ``jax.distributed.initialize()`` first and feed each host its
slice of the global batch (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import distributed, lora
from .audio import MelConfig
from .layers import LoRAParam
from .losses import C_KL, C_MEL, discriminator_loss, feature_loss, generator_loss, kl_loss, mel_l1
from .models.synthesizer import Synthesizer, slice_segments


PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
# What --remat recomputes in the backward pass instead of keeping its activations.
REMAT_CHOICES = ("none", "discriminator", "decoder", "all")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run's hyper-parameters. The defaults are RVC's (``configs/*.json``
    ``train`` and its ``AdamW``/``ExponentialLR``); code that needs RVC's optimizer
    settings (e.g. an exported checkpoint's empty AdamW state) reads them from here."""

    batch_size: int = 4
    segment_frames: int = 32  # RVC: train.segment_size // hop (32 at 40k)
    lr: float = 1e-4
    lr_d: float | None = None  # default: lr
    lr_decay: float = 0.999875  # per epoch (RVC's ExponentialLR)
    betas: tuple[float, float] = (0.8, 0.99)
    eps: float = 1e-9
    weight_decay: float = 0.01
    c_mel: float = C_MEL
    c_kl: float = C_KL
    seed: int = 1234
    train_d: bool = True
    precision: str = "fp32"  # compute dtype of activations and conv/matmul inputs: PRECISIONS
    remat: str = "none"  # REMAT_CHOICES

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"remat must be one of {REMAT_CHOICES}, got {self.remat!r}")


def lr_schedule(lr: float, decay: float, steps_per_epoch: int) -> Callable:
    """RVC's learning rate after ``step`` optimizer steps: ``lr · decay^epoch`` (its
    ``ExponentialLR`` stepped once per epoch of ``steps_per_epoch`` batches)."""
    spe = max(int(steps_per_epoch), 1)

    def schedule(step):
        return lr * decay ** (step // spe)
    return schedule


def _adamw(schedule: Callable, cfg: TrainConfig):
    return optax.adamw(schedule, b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps, weight_decay=cfg.weight_decay)


def _f32(tree):
    """Cast a pytree of (possibly bfloat16) arrays to float32: every loss is float32."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def with_compute_dtype(module: nnx.Module, dtype) -> nnx.Module:
    """A new module object over the *same* arrays (nothing is copied) whose layers all
    compute in ``dtype`` (``None``: the module as it is). The stored parameter dtype is
    unchanged; ``module`` itself is not modified."""
    graphdef, state = nnx.split(module)
    clone = nnx.merge(graphdef, state)
    if dtype is not None:
        for _, m in nnx.iter_modules(clone):
            if hasattr(m, "dtype"):
                m.dtype = dtype
    return clone


class _Remat(nnx.Module):
    """Wraps a module so its call runs under ``jax.checkpoint``: only its inputs are kept
    for the backward pass, and its activations are recomputed there. Used on the
    ephemeral modules rebuilt inside the traced step, never on the caller's."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        graphdef, state = nnx.split(self.inner)

        @jax.checkpoint
        def run(state, args, kwargs):
            m = nnx.merge(graphdef, state)
            out = m(*args, **kwargs)
            return out, nnx.state(m, nnx.RngState)  # e.g. a dropout's RNG counter advanced inside

        out, rng = run(state, args, kwargs)
        if jax.tree.leaves(rng):
            nnx.update(self.inner, rng)
        return out


@dataclasses.dataclass
class Trainer:
    """Holds the frozen parts and the compiled step; the trainable state is a pytree dict
    ``{"g": adapter, "d": discriminator params, "opt_g", "opt_d", "step"}``."""

    generator: Synthesizer
    discriminator: nnx.Module
    config: TrainConfig
    steps_per_epoch: int
    mesh: Mesh | None = None

    def __post_init__(self):
        g = self.generator
        if g.enc_q is None:
            raise ValueError("training needs the posterior encoder enc_q: use a pretrained base or a G_*.pth "
                             "training checkpoint, not a small inference model")
        if not list(lora.iter_lora_layers(g)) or not jax.tree.leaves(nnx.state(g, LoRAParam)):
            raise ValueError("the generator has no LoRA adapter; call lora.inject first")
        c = self.config
        self.compute_dtype = PRECISIONS[c.precision] if c.precision != "fp32" else None
        self.g_graphdef, g_adapter, g_base, g_rest = nnx.split(with_compute_dtype(g, self.compute_dtype),
                                                               LoRAParam, nnx.Param, ...)
        self.d_graphdef, d_params = nnx.split(with_compute_dtype(self.discriminator, self.compute_dtype),
                                              nnx.Param)
        # New containers around the same arrays (no copy): load_into_models() replaces the
        # modules' Variables' values, which must not change what init_state() starts from.
        self._initial = jax.tree.map(lambda x: x, {"g": g_adapter, "d": d_params})
        self.lr_g = lr_schedule(c.lr, c.lr_decay, self.steps_per_epoch)
        self.tx_g = _adamw(self.lr_g, c)
        self.tx_d = _adamw(lr_schedule(c.lr_d or c.lr, c.lr_decay, self.steps_per_epoch), c)
        self.mel = MelConfig.for_rate(g.config.sr)
        self.hop = g.config.hop_length
        if self.mel.hop_length != self.hop:
            raise ValueError(f"mel hop {self.mel.hop_length} != generator hop {self.hop}")
        self.root_key = jax.random.key(c.seed)
        # Shapes and dtypes only: the state itself is made by init_state() when needed (a
        # second resident copy of D and its AdamW moments would cost 3x D's size).
        self._state_shapes = jax.eval_shape(self._fresh_state, self._initial)
        self.structure_hash()
        if self.mesh is None:
            self.mesh = Mesh(np.array(jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        # The frozen base is passed to every call (not closed over: see the module docstring).
        self.frozen = jax.device_put({"base": g_base, "rest": g_rest}, self.replicated)
        # Only the state is donated: its outputs alias it. The batch and the frozen base
        # have no output of their shape to alias (and the base is reused every step).
        self._step = jax.jit(self._train_step, donate_argnums=(0,),
                             in_shardings=(self.replicated, self.batch_sharding, self.replicated),
                             out_shardings=(self.replicated, self.replicated))
        self._compiled: dict = {}
        self._evaluate = jax.jit(self._evaluate_fn)

    # ------------------------------------------------------------------ state
    def _fresh_state(self, initial):
        return {"g": initial["g"], "d": initial["d"], "opt_g": self.tx_g.init(initial["g"]),
                "opt_d": self.tx_d.init(initial["d"]), "step": jnp.zeros((), jnp.int32)}

    def init_state(self) -> dict:
        # fresh buffers: the step donates its input state, which must not delete the initial values
        copied = jax.tree.map(lambda x: jnp.array(x, copy=True), self._initial)
        return jax.device_put(self._fresh_state(copied), self.replicated)

    def state_template(self) -> dict:
        """The state's structure with (lazily allocated, uninitialised) numpy leaves: a
        restore target that costs no memory until it is written."""
        return jax.tree.map(lambda s: np.empty(s.shape, s.dtype), self._state_shapes)

    def put_batch(self, batch: dict) -> dict:
        if jax.process_count() > 1:  # multi-host: ``batch`` holds this process's rows only
            return distributed.put_process_batch(batch, self.batch_sharding)
        n = self.mesh.devices.size
        b = next(iter(batch.values())).shape[0]
        if b % n:
            raise ValueError(f"batch size {b} is not divisible by the {n} devices of the data mesh")
        return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, self.batch_sharding)

    def structure_hash(self) -> str:
        """Identifies the state's structure (paths, shapes, dtypes) for safe resumes."""
        if not hasattr(self, "_structure"):
            leaves = jax.tree_util.tree_flatten_with_path(self._state_shapes)[0]
            h = hashlib.sha256()
            for path, x in leaves:
                h.update(f"{jax.tree_util.keystr(path)}:{tuple(x.shape)}:{x.dtype};".encode())
            self._structure = h.hexdigest()[:16]
        return self._structure

    # ------------------------------------------------------------------ compilation
    @staticmethod
    def batch_signature(batch: dict) -> tuple:
        """(key, shape, dtype) of every entry: which compiled executable a batch runs."""
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

    def compile(self, batch: dict) -> float:
        """Compile the step ahead of time for the shapes of ``batch`` (a batch as
        :meth:`step` takes it); later steps on batches of those shapes use it. Returns the
        seconds it took (0.0 when already compiled). With the persistent compilation cache
        on (:mod:`rvclora_jax.compilation`), a configuration compiled by an earlier run is
        read from disk instead."""
        placed = self.put_batch(batch)  # the global shapes and shardings the step will see
        sig = self.batch_signature(placed)
        if sig in self._compiled:
            return 0.0
        t0 = time.perf_counter()
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
                             self._state_shapes)
        b = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), placed)
        self._compiled[sig] = self._step.lower(state, b, self.frozen).compile()
        return time.perf_counter() - t0

    def is_compiled(self, batch: dict) -> bool:
        """Whether :meth:`compile` has compiled the step for ``batch``'s shapes."""
        return self.batch_signature(self.put_batch(batch)) in self._compiled

    def compiled_memory(self) -> dict | None:
        """XLA's own account of the compiled steps' buffers (bytes, the largest over the
        compiled shapes): arguments, outputs, aliased (donated) and temporaries."""
        out = None
        for c in self._compiled.values():
            ma = c.memory_analysis()
            if ma is None:
                continue
            cur = {k: int(getattr(ma, k + "_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
            out = cur if out is None else {k: max(out[k], cur[k]) for k in cur}
        return out

    # ------------------------------------------------------------------ the step
    def _gen_forward(self, adapter, frozen, batch, key):
        g = nnx.merge(self.g_graphdef, adapter, frozen["base"], frozen["rest"])
        if self.config.remat in ("decoder", "all"):
            g.dec = _Remat(g.dec)
        seg = self.config.segment_frames
        k_eps, k_ids, k_src = jax.random.split(key, 3)
        B, T = batch["phone"].shape[:2]
        eps_q = jax.random.normal(k_eps, (B, batch["spec"].shape[1], g.config.inter_channels))
        # RVC: ids = floor(U[0,1) · (len − seg + 1))
        span = jnp.maximum(batch["spec_lengths"] - seg + 1, 1).astype(jnp.float32)
        ids = jnp.floor(jax.random.uniform(k_ids, (B,)) * span).astype(jnp.int32)
        noise = jax.random.normal(k_src, (B, seg * self.hop, 1)) if g.f0 else None
        o, _, _, y_mask, stats = g(batch["phone"], batch["phone_lengths"], batch.get("pitch"), batch.get("pitchf"),
                                   batch["spec"], batch["spec_lengths"], batch["sid"], ids_slice=ids,
                                   segment_size=seg, eps_q=eps_q, source_noise=noise)
        return (o, stats), (y_mask, ids)

    def _d_apply(self, d_params, y):
        """(scores, feature maps), float32 whatever the compute dtype."""
        d = nnx.merge(self.d_graphdef, d_params)
        if self.config.remat in ("discriminator", "all") and hasattr(d, "discriminators"):
            # one checkpoint per sub-discriminator: the backward pass holds one
            # sub-discriminator's activations at a time
            scores, fmaps = [], []
            for sub in d.discriminators:
                s, f = _Remat(sub)(y)
                scores.append(s)
                fmaps.append(f)
            return _f32((scores, fmaps))
        if self.config.remat in ("discriminator", "all"):  # a discriminator without sub-discriminators
            return _f32(jax.checkpoint(lambda p, y: nnx.merge(self.d_graphdef, p).apply_one(y))(d_params, y))
        return _f32(d.apply_one(y))

    def _generator_loss(self, d_params, o, stats, y_mask, wave, y_mel):
        """RVC's generator objective on the generated segment ``o`` against discriminator
        ``d_params``: ``(total, {"loss_g", "mel", "kl", "fm", "adv"}, the tensors the
        terms were computed from)``. Every term is computed in float32."""
        c = self.config
        o, stats = _f32((o, stats))
        z, z_p, m_p, logs_p, m_q, logs_q = stats
        y_hat_mel = self.mel.mel(o[..., 0])
        _, fmap_r = self._d_apply(d_params, wave)
        fake, fmap_g = self._d_apply(d_params, o)
        loss_mel = mel_l1(y_mel, y_hat_mel) * c.c_mel
        loss_kl = kl_loss(z_p, logs_q, m_p, logs_p, y_mask) * c.c_kl
        loss_fm = feature_loss(fmap_r, fmap_g)
        loss_adv = generator_loss(fake)[0]
        total = loss_adv + loss_fm + loss_mel + loss_kl
        parts = {"loss_g": total, "mel": loss_mel, "kl": loss_kl, "fm": loss_fm, "adv": loss_adv}
        tensors = {"y_hat": o, "y_mel": y_mel, "y_hat_mel": y_hat_mel, "fmap_r": fmap_r, "fmap_g": fmap_g,
                   "fake": fake, "z_p": z_p, "logs_q": logs_q, "m_p": m_p, "logs_p": logs_p, "z_mask": y_mask}
        return total, parts, tensors

    def _segments(self, batch, ids):
        """The real audio and spectrogram's mel under the generated segment (RVC's slices)."""
        seg, hop = self.config.segment_frames, self.hop
        wave = slice_segments(batch["wave"][..., None], ids * hop, seg * hop)
        y_mel = self.mel.spec_to_mel(slice_segments(batch["spec"], ids, seg))
        return wave, y_mel

    def _train_step(self, state, batch, frozen):
        c = self.config
        key = jax.random.fold_in(self.root_key, state["step"])
        (o, stats), g_vjp, (y_mask, ids) = jax.vjp(
            lambda ad: self._gen_forward(ad, frozen, batch, key), state["g"], has_aux=True)
        wave, y_mel = self._segments(batch, ids)

        # 1) discriminator step on the generated audio with gradients stopped
        def d_loss_fn(dp):
            # real and generated audio in one batch (D has no batch-coupled ops): same
            # result as two calls, ~12% faster on CPU
            both, _ = self._d_apply(dp, jnp.concatenate([wave, jax.lax.stop_gradient(o).astype(wave.dtype)], axis=0))
            n = wave.shape[0]
            return discriminator_loss([s[:n] for s in both], [s[n:] for s in both])[0]

        loss_d, grads_d = jax.value_and_grad(d_loss_fn)(state["d"])
        if c.train_d:
            upd, opt_d = self.tx_d.update(grads_d, state["opt_d"], state["d"])
            d_params = optax.apply_updates(state["d"], upd)
        else:
            opt_d, d_params = state["opt_d"], state["d"]

        # 2) generator loss with the updated discriminator, pulled back to the adapter
        def g_loss_fn(o, stats):
            total, parts, _ = self._generator_loss(d_params, o, stats, y_mask, wave, y_mel)
            return total, parts

        (_, parts), cot = jax.value_and_grad(g_loss_fn, argnums=(0, 1), has_aux=True)(o, stats)
        (grads_g,) = g_vjp(cot)
        upd, opt_g = self.tx_g.update(grads_g, state["opt_g"], state["g"])
        g_adapter = optax.apply_updates(state["g"], upd)
        step = state["step"] + 1
        metrics = dict(parts, loss_d=loss_d, lr=self.lr_g(state["step"]), grad_norm_g=optax.global_norm(grads_g))
        return {"g": g_adapter, "d": d_params, "opt_g": opt_g, "opt_d": opt_d, "step": step}, metrics

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        b = self.put_batch(batch)
        fn = self._compiled.get(self.batch_signature(b), self._step)
        return fn(state, b, self.frozen)

    def _evaluate_fn(self, adapter, d_params, frozen, batch, key):
        (o, stats), (y_mask, ids) = self._gen_forward(adapter, frozen, batch, key)
        wave, y_mel = self._segments(batch, ids)
        _, parts, tensors = self._generator_loss(d_params, o, stats, y_mask, wave, y_mel)
        return parts, dict(tensors, wave=wave, ids=ids)

    def evaluate(self, adapter, d_params, batch: dict, key: jax.Array) -> tuple[dict, dict]:
        """The generator's losses on ``batch`` without an update: the train step's forward
        with random draws from ``key`` and discriminator ``d_params`` (e.g. a state's
        ``"g"`` and ``"d"``). Returns ``(losses, tensors)``: the step's loss terms and the
        tensors they were computed from (generated/real segments ``y_hat``/``wave``, their
        mels, the segments' start frames ``ids``, discriminator scores ``fake`` and feature
        maps, the KL inputs), all float32."""
        return self._evaluate(adapter, d_params, self.frozen, self.put_batch(batch), key)

    # ------------------------------------------------------------------ results
    def load_into_models(self, state: dict) -> None:
        """Write the trained adapter and D back into the NNX modules."""
        nnx.update(self.generator, jax.device_get(state["g"]))
        nnx.update(self.discriminator, jax.device_get(state["d"]))


# ---------------------------------------------------------------------- checkpoints


class Checkpoints:
    """Orbax checkpoints of the whole training state plus the data position.

    The state tree is saved as its flat leaf list (its structure is rebuilt from the
    model and config on resume, and checked with a structure hash)."""

    def __init__(self, directory: str, *, keep: int = 3):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: dict, meta: dict) -> None:
        ocp = self.ocp
        leaves = jax.tree.leaves(jax.device_get(state))
        tree = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
        step = int(meta["step"])
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, template: dict, step: int | None = None) -> tuple[dict, dict]:
        ocp = self.ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        leaves, treedef = jax.tree.flatten(jax.device_get(template))
        target = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
        tree = out["state"]
        restored = [np.asarray(tree[f"{i:05d}"]) for i in range(len(leaves))]
        return jax.tree.unflatten(treedef, restored), dict(out["meta"])

    def close(self):
        self.manager.close()


# ---------------------------------------------------------------------- the loop


@dataclasses.dataclass
class LoopResult:
    state: dict
    step: int
    interrupted: bool
    metrics: list[dict]
    start: int = 0  # the step this call started (or resumed) from


@dataclasses.dataclass
class Hooks:
    """What :func:`train_loop` calls back, each with ``(state, step)``. ``state`` is live
    only during the call: the next step donates its buffers, so copy what you keep."""

    on_step: Callable[[dict, int], None] | None = None  # after every step
    on_save: Callable[[dict, int], None] | None = None  # after every periodic checkpoint


def train_loop(trainer: Trainer, batches, *, total_steps: int, run_dir: str, save_every: int = 500,
               keep: int = 3, log_every: int = 10, resume: bool = False, progress: bool = True,
               stop_at: int | None = None, hooks: Hooks | None = None, compile_ahead: bool = True,
               log: Callable[[str], None] | None = None) -> LoopResult:
    """Run (or resume) training to ``total_steps`` with checkpoints in ``run_dir/checkpoints``.

    ``batches`` is a :class:`rvclora_jax.data.Batches` (``len()`` batches per epoch,
    ``iterate(epoch, start)``). Metrics go to ``run_dir/metrics.jsonl``. SIGINT/SIGTERM
    (Ctrl-C) saves a checkpoint (or keeps the one just written at that step) and returns
    with ``interrupted=True``; resuming a finished run returns its final state without a
    step. ``resume`` with no checkpoint is an error (nothing to resume). A non-finite loss,
    gradient norm or state stops the run with a ValueError naming the step, before that
    state is saved: the last good checkpoint stays the latest. ``stop_at`` stops
    early at that step without a final save (for tests of resumption). ``hooks``: see
    :class:`Hooks`. ``compile_ahead`` compiles the step for every batch shape of
    ``batches`` before the first step (:func:`rvclora_jax.compilation.precompile`), with its
    ``compiling…`` lines sent to ``log`` (default: print when ``progress``). Logged metric
    lines carry the peak host RSS (and device memory where the backend reports it)."""
    from .compilation import peak_memory, precompile, trim_host_memory
    from .data import prefetch

    if log is None and progress:
        log = print

    hooks = hooks or Hooks()
    primary = distributed.is_primary()  # multi-host: only process 0 writes metrics (all save checkpoints)

    os.makedirs(run_dir, exist_ok=True)
    ckpts = Checkpoints(os.path.join(run_dir, "checkpoints"), keep=keep)
    spe = len(batches)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if resume and ckpts.latest_step() is not None:
        # the restore target costs no memory: the initial state is never built on resume
        restored, meta = ckpts.restore(trainer.state_template())
        if meta.get("structure") != trainer.structure_hash():
            raise ValueError(f"{ckpts.directory}: checkpoint was made with a different model/adapter/optimizer "
                             f"configuration (structure {meta.get('structure')} != {trainer.structure_hash()})")
        state = jax.device_put(restored, trainer.replicated)
        start = int(meta["step"])
        if primary:
            _truncate_metrics(metrics_path, start)
    elif resume:
        # Restarting silently would append a second step 1.. to metrics.jsonl.
        ckpts.close()
        raise FileNotFoundError(f"{run_dir}: nothing to resume (no checkpoint in {ckpts.directory}); start a new "
                                f"run without resume")
    else:
        if ckpts.latest_step() is not None:
            raise ValueError(f"{run_dir}: already holds checkpoints; pass --resume to continue or use a new --out")
        start = 0
        if primary and os.path.exists(metrics_path):
            os.unlink(metrics_path)
        state = trainer.init_state()
    if compile_ahead and start < total_steps:
        precompile(trainer, batches, log=log)
        # the compiler's working memory is free now: hand it back before the steps allocate
        trim_host_memory()

    stop = distributed.StopFlag()  # multi-host: every process stops after the same step

    def _handler(signum, frame):
        stop.request()

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, _handler)
        except ValueError:  # not in the main thread
            pass

    def save(state, step):
        # The state just checked finite is the one saved; a step already saved (Ctrl-C right
        # after a periodic checkpoint, the resume of a finished run) is that same state.
        if ckpts.latest_step() == step:
            return
        _check_finite_state(state, step, ckpts.directory)
        ckpts.save(state, meta_for(step))

    def meta_for(step):
        return {"step": step, "epoch": step // spe, "batch_in_epoch": step % spe, "seed": trainer.config.seed,
                "structure": trainer.structure_hash()}

    logged: list[dict] = []
    bar = None
    if progress and primary:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True)
    step = start
    interrupted = False
    try:
        with open(metrics_path if primary else os.devnull, "a") as mf:
            while step < total_steps and not stop.flag:
                epoch, offset = divmod(step, spe)
                feed = prefetch(batches.iterate(epoch, start=offset), size=2)
                try:
                    for batch in feed:
                        if step >= total_steps or stop.flag or (stop_at is not None and step >= stop_at):
                            break
                        t0 = time.perf_counter()
                        state, m = trainer.step(state, batch)
                        step += 1
                        stop.sync()
                        _check_finite_losses(m, step, ckpts)
                        if step % log_every == 0 or step == total_steps or step == 1:
                            m = {k: float(v) for k, v in jax.device_get(m).items()}
                            rec = {"step": step, "epoch": epoch, **m, "step_time": time.perf_counter() - t0,
                                   **peak_memory()}
                            mf.write(json.dumps(rec) + "\n")
                            mf.flush()
                            logged.append(rec)
                            if bar is not None:
                                bar.set_postfix(mel=f"{m['mel']:.3f}", g=f"{m['loss_g']:.2f}", d=f"{m['loss_d']:.2f}")
                        if bar is not None:
                            bar.update(1)
                        if step % save_every == 0 and step < total_steps:
                            save(state, step)
                            if hooks.on_save:
                                hooks.on_save(state, step)
                        if hooks.on_step:
                            hooks.on_step(state, step)
                finally:
                    feed.close()
                if stop_at is not None and step >= stop_at:
                    break
        if stop.flag:
            interrupted = True
            save(state, step)
        elif stop_at is None or step >= total_steps:
            save(state, step)
    finally:
        if bar is not None:
            bar.close()
        for sig, h in old.items():
            signal.signal(sig, h)
        ckpts.close()
    return LoopResult(state, step, interrupted, logged, start)


# Losses and the gradient norm every step reports: a non-finite one means the step's update
# (and so the state after it) is not to be trusted.
_WATCHED = ("loss_g", "loss_d", "grad_norm_g")


def _diverged(what: str, step: int, ckpts: Checkpoints) -> ValueError:
    last = ckpts.latest_step()
    kept = (f"the last good checkpoint, step {last}, is kept in {ckpts.directory}" if last is not None
            else "no checkpoint was saved before it")
    return ValueError(f"training diverged at step {step}: {what}; stopped without saving that state ({kept}); "
                      f"try a lower --lr")


def _check_finite_losses(metrics: dict, step: int, ckpts: Checkpoints) -> None:
    vals = jax.device_get({k: metrics[k] for k in _WATCHED if k in metrics})
    bad = [f"{k} is {float(v)}" for k, v in vals.items() if not np.isfinite(v)]
    if bad:
        raise _diverged(", ".join(bad), step, ckpts)


def _check_finite_state(state: dict, step: int, directory: str) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            raise ValueError(f"training diverged at step {step}: non-finite values in the state "
                             f"{jax.tree_util.keystr(path)}; not saved to {directory}; try a lower --lr")


def _truncate_metrics(path: str, step: int) -> None:
    """On resume, drop metric lines past the checkpoint (they will be re-logged)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError):
                pass
    with open(path, "w") as f:
        f.writelines(keep)
