"""One-shot accelerator check: rvclora-jax vs RVC's own PyTorch, on one GPU, in one table.

    python benchmarks/device_check.py                  # GPU (jax[cuda] + torch with CUDA)
    python benchmarks/device_check.py --platform cpu --tiny    # dry run (what the test does)

Life cycle: detect what the machine has (jax, torch, ``rvc==0.3.5``, librosa; a missing
librosa is replaced by a stand-in whose ``filters.mel`` is rvclora_jax's own Slaney
filterbank, a missing rvc or torch skips the PyTorch columns — every stub/skip is named
in the table's notes) → build RVC's v2 40k f0 generator and multi-period discriminator in
PyTorch with random weights and load the same weights into the JAX models → measure:

1. forward parity (fp32, TF32 off on both sides, ``jax_default_matmul_precision=highest``):
   the synthesizer's inference output and the discriminator's scores and feature maps;
2. the training step at each ``--batches`` size: JAX LoRA step fp32 and bf16 (models built
   with ``dtype=bfloat16``: bf16 activations, fp32 parameters) vs RVC's full fine-tune step in
   fp32 and with ``torch.autocast(float16)`` + ``GradScaler`` (RVC's ``fp16_run``): median
   step time, steps/s, the first step's extra time (JAX: compilation), peak device memory
   (JAX ``memory_stats()['peak_bytes_in_use']`` — a process-wide high-water mark, so the
   per-row figure is the compiled step's own footprint from ``memory_analysis()``; torch
   ``max_memory_allocated`` reset per row);
3. every distinct convolution of the step (input shape × layer settings, collected with
   forward hooks on the PyTorch models): forward, input gradient and weight gradient, JAX
   (the project's own layers, jit) vs torch, flagging any JAX op more than 2× slower;
4. ``rvclora infer``'s pipeline vs RVC's ``Pipeline.pipeline`` on a 30 s input
   (``bench_vc.py``'s files: first and steady conversion, real-time factor);
5. the front end (``bench_frontend_{hubert,rmvpe,fcpe}.py``'s builders), each model with the
   same random weights on both sides: HuBERT base content features (real hubert-base config,
   v2 = layer 12) vs ``transformers.HubertModel`` on 3.7 s clips; RMVPE vs RVC's
   ``rvc.lib.rmvpe`` (full-size ``E2E(4, 1, (2, 2))``, random batch-norm statistics) on 2 s
   clips; FCPE vs torchfcpe's bundled model on 2 s clips when torchfcpe imports (else the
   JAX port alone, random weights in the bundled architecture, as the row's note says):
   forward parity (max |Δ| of the features / salience, fp32 as in 1.), then at batch 1 and
   batch 8 the first call (JAX: compilation included) and the median of ``--frontend-reps``
   steady calls, each wav in → features / f0 out on the host, decoding included.

Prints ONE table (``section | item | jax | torch | torch/jax | note``) and, with ``--json``,
writes the same rows to a file. A failing row is reported in the table, not raised, so one
unsupported path does not hide the others. Budget: about 5 minutes on one GPU at the
default sizes (``--conv-limit`` trims the conv list to the largest ones; ``--skip`` drops
sections, or single front-end models: ``hubert``, ``rmvpe``, ``fcpe``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_CONVERT = os.path.join(ROOT, "convert")

ROWS: list[dict] = []
NOTES: list[str] = []
PRETEND_MISSING: set[str] = set()  # --pretend-missing: modules treated as not installed
FRONTEND_PARTS = ("hubert", "rmvpe", "fcpe")


def _importable(name: str) -> bool:
    return name not in PRETEND_MISSING and importlib.util.find_spec(name) is not None


def row(section, item, jax_v=None, torch_v=None, note="", unit=""):
    ratio = None
    if isinstance(jax_v, (int, float)) and isinstance(torch_v, (int, float)) and jax_v and section in (
            "step", "conv", "compile", "infer", "frontend"):
        ratio = torch_v / jax_v
    ROWS.append({"section": section, "item": item, "jax": jax_v, "torch": torch_v, "ratio": ratio,
                 "note": note, "unit": unit})


def _fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        if unit == "err":
            return f"{v:.2e}"
        return f"{v:.3g}{unit and ' ' + unit}"
    return f"{v}{unit and ' ' + unit}"


def print_table():
    hdr = ("section", "item", "jax", "torch", "torch/jax", "note")
    lines = [(r["section"], r["item"], _fmt(r["jax"], r["unit"]), _fmt(r["torch"], r["unit"]),
              "-" if r["ratio"] is None else f"{r['ratio']:.2f}", r["note"]) for r in ROWS]
    w = [max(len(h), *(len(str(x[i])) for x in lines)) if lines else len(h) for i, h in enumerate(hdr)]
    fmt = " | ".join(f"{{:{'<' if i in (0, 1, 5) else '>'}{w[i]}}}" for i in range(len(hdr)))
    print(fmt.format(*hdr))
    print("-+-".join("-" * x for x in w))
    for x in lines:
        print(fmt.format(*x))
    for n in NOTES:
        print("note: " + n)


# ------------------------------------------------------------------- environment


def setup_environment(args):
    """Platform flags before jax/torch start; the librosa stand-in; what is missing."""
    if args.platform:
        os.environ["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(args.platform, args.platform)
    # JAX would otherwise take 75% of the GPU up front and starve torch's allocator.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if os.path.isdir(_CONVERT) and importlib.util.find_spec("rvclora_convert") is None:
        # a fresh copy of the tree, not pip-installed: the converter package lives in convert/
        shim = os.path.join(ROOT, ".pyshim")
        os.makedirs(shim, exist_ok=True)
        link = os.path.join(shim, "rvclora_convert")
        if not os.path.exists(link):
            os.symlink(os.path.join("..", "convert"), link)
        sys.path.insert(0, shim)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    have = {m: _importable(m) for m in ("torch", "rvc", "librosa", "transformers", "torchfcpe")}
    if not have["rvc"]:
        wheels = os.path.join(ROOT, "benchmarks", "wheels")
        for f in sorted(os.listdir(wheels)) if os.path.isdir(wheels) else []:
            if f.startswith("rvc-") and f.endswith(".whl"):
                sys.path.insert(0, os.path.join(wheels, f))  # a pure-Python wheel imports as a zip
                have["rvc"] = importlib.util.find_spec("rvc") is not None
                NOTES.append(f"rvc imported from the carried wheel benchmarks/wheels/{f}")
                break
    if have["rvc"] and not have["librosa"]:
        _stub_librosa()
        NOTES.append("librosa missing: stubbed (rvc needs librosa.filters.mel: the stand-in is rvclora_jax's "
                     "Slaney bank, or with htk=True (rvc.lib.rmvpe) the RMVPE port's HTK bank, both equal to "
                     "librosa's; rvc.lib.rmvpe's librosa.util import gets empty names, its STFT is not used)")
    if not have["torch"]:
        NOTES.append("torch missing: every PyTorch column is skipped")
    elif not have["rvc"]:
        NOTES.append("rvc==0.3.5 missing (pip download --no-deps rvc==0.3.5 -d benchmarks/wheels): "
                     "PyTorch reference skipped")
    return have


def _stub_librosa():
    """``librosa`` as far as rvc's modules use it: ``filters.mel`` (Slaney, or HTK with
    ``htk=True`` as ``rvc.lib.rmvpe``'s mel extractor asks; both tested equal to librosa's)
    and the names ``rvc.lib.rmvpe`` imports from ``librosa.util``. The modules carry a
    ``__spec__``: ``import transformers`` asks ``importlib.util.find_spec("librosa")``, which
    raises for a module in ``sys.modules`` without one."""
    import importlib.machinery

    from rvclora_jax.audio import mel_filterbank
    from rvclora_jax.frontend.rmvpe import mel_filterbank as htk_mel_filterbank

    def module(name, package=False):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
        return m

    lib, filters, util = module("librosa", True), module("librosa.filters"), module("librosa.util")

    def mel(*, sr, n_fft, n_mels=128, fmin=0.0, fmax=None, htk=False, norm="slaney", dtype=None):
        if norm != "slaney":
            raise NotImplementedError(f"device_check's librosa stand-in: filters.mel(norm={norm!r})")
        if htk:
            bank = htk_mel_filterbank(sr, n_fft, n_mels, fmin, sr / 2.0 if fmax is None else fmax)
        else:
            bank = mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
        return bank if dtype is None else bank.astype(dtype)

    filters.mel = mel
    lib.filters = filters
    # rvc.lib.rmvpe's import line (from librosa.util import normalize, pad_center, tiny): only
    # its STFT class uses them; RMVPE's mel extractor is torch.stft and the bank above
    util.normalize = util.pad_center = util.tiny = None
    lib.util = util
    sys.modules["librosa"], sys.modules["librosa.filters"], sys.modules["librosa.util"] = lib, filters, util


def describe_devices(have):
    import jax

    d = jax.devices()[0]
    row("env", "device", f"{d.platform}:{getattr(d, 'device_kind', '')}", _torch_device_name(have),
        note=f"jax {jax.__version__}, python {platform.python_version()}")


def _torch_device_name(have):
    if not have["torch"]:
        return None
    import torch

    return (f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu") + \
        f" (torch {torch.__version__})"


# ------------------------------------------------------------------- models


def config(tiny: bool):
    from rvclora_jax.families.rvc import RVC

    cfg = RVC.preset("v2", 40000)
    if tiny:
        cfg = cfg.replace(inter_channels=16, hidden_channels=32, filter_channels=64, n_layers=1,
                          upsample_initial_channel=32, gin_channels=8, spk_embed_dim=2)
    return cfg


PERIODS_TINY = (2,)


def torch_models(cfg, tiny, dev):
    import torch
    from rvc.lib.infer_pack.models import MultiPeriodDiscriminatorV2, SynthesizerTrnMs768NSFsid

    torch.manual_seed(0)
    g = SynthesizerTrnMs768NSFsid(*cfg.to_list(), is_half=False)
    d = MultiPeriodDiscriminatorV2(False)
    if tiny:  # DiscriminatorS + the first periods only (the JAX side builds the same list)
        d.discriminators = torch.nn.ModuleList(list(d.discriminators)[:1 + len(PERIODS_TINY)])
    return g.to(dev), d.to(dev)


def jax_models(cfg, tiny, dtype=None, torch_g=None, torch_d=None, lora_rank=8):
    """The JAX generator (LoRA injected when ``lora_rank``) and discriminator, with torch's
    weights when given (same weights for parity and for a like-for-like step)."""
    from flax import nnx

    from rvclora_jax import lora
    from rvclora_jax.models import synthesizer as S
    from rvclora_jax.models.discriminators import V2_PERIODS, MultiPeriodDiscriminator

    g = S.Synthesizer(cfg, "v2", True, rngs=nnx.Rngs(0), dtype=dtype)
    d = MultiPeriodDiscriminator(PERIODS_TINY if tiny else V2_PERIODS, rngs=nnx.Rngs(1), dtype=dtype)
    if torch_g is not None:
        from rvclora_convert.state_dict import load_params, torch_to_flax

        for jm, tm in ((g, torch_g), (d, torch_d)):
            sd = {k: v.detach().cpu().numpy().copy() for k, v in tm.state_dict().items()}
            load_params(jm, torch_to_flax(jm, sd))
    if lora_rank:
        lora.inject(g, lora.LoRAConfig.from_preset("generator", rank=lora_rank), rngs=nnx.Rngs(2))
    return g, d


def batch_np(B, T, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    hop = 400
    return {
        "phone": rng.standard_normal((B, T, 768)).astype(np.float32),
        "phone_lengths": np.full((B,), T, np.int32),
        "pitch": rng.integers(1, 256, (B, T)).astype(np.int32),
        "pitchf": (100 + 150 * rng.random((B, T))).astype(np.float32),
        "wave": (0.3 * rng.standard_normal((B, T * hop))).astype(np.float32),
        "wave_lengths": np.full((B,), T * hop, np.int32),
        "sid": np.zeros((B,), np.int32),
    }


# ------------------------------------------------------------------- 1. parity


def parity(cfg, tiny, dev):
    import jax.numpy as jnp
    import numpy as np
    import torch

    tg, td = torch_models(cfg, tiny, dev)
    tg.eval()
    td.eval()
    jg, jd = jax_models(cfg, tiny, torch_g=tg, torch_d=td, lora_rank=0)
    B, T = 2, 24
    b = batch_np(B, T, seed=1)
    t = {k: torch.from_numpy(v).to(dev) for k, v in b.items()}
    t["pitch"], t["sid"] = t["pitch"].long(), t["sid"].long()
    # RVC draws its noise inside infer(); replay the same draws on the same device for JAX
    torch.manual_seed(21)
    with torch.no_grad():
        want = tg.infer(t["phone"], t["phone_lengths"], t["pitch"], t["pitchf"], t["sid"])[0]
    torch.manual_seed(21)
    eps = torch.randn(B, cfg.inter_channels, T, device=dev)
    torch.rand(B, 1, device=dev)
    noise = torch.randn(B, T * cfg.hop_length, 1, device=dev)
    got = jg.infer(jnp.asarray(b["phone"]), jnp.asarray(b["phone_lengths"]), jnp.asarray(b["pitch"]),
                   jnp.asarray(b["pitchf"]), jnp.asarray(b["sid"]),
                   eps=jnp.asarray(eps.cpu().numpy().transpose(0, 2, 1)), source_noise=jnp.asarray(noise.cpu().numpy()))[0]
    w = want.cpu().numpy().transpose(0, 2, 1)
    err = float(np.abs(np.asarray(got, np.float64) - w).max())
    row("parity", "synthesizer infer audio max|d|", err, None, unit="err",
        note=f"rel {err / max(float(np.abs(w).max()), 1e-12):.1e}; fp32, TF32 off, precision=highest")
    rng = np.random.default_rng(7)
    N = 12010 if not tiny else 4010
    y = (0.5 * rng.standard_normal((B, 1, N))).astype(np.float32)
    yh = (0.5 * rng.standard_normal((B, 1, N))).astype(np.float32)
    with torch.no_grad():
        r_r, r_g, f_r, f_g = td(torch.from_numpy(y).to(dev), torch.from_numpy(yh).to(dev))
    s_r, fm_r = jd.apply_one(jnp.asarray(y.transpose(0, 2, 1)))
    e_s, e_f, scale = 0.0, 0.0, 0.0
    for a, bt in zip(s_r, r_r):
        e_s = max(e_s, float(np.abs(np.asarray(a) - bt.cpu().numpy()).max()))
    for i, (fa, fb) in enumerate(zip(fm_r, f_r)):
        for a, bt in zip(fa, fb):
            bn = bt.cpu().numpy()
            bn = bn.transpose(0, 2, 1) if bn.ndim == 3 else bn.transpose(0, 2, 3, 1)  # -> channels-last
            e_f = max(e_f, float(np.abs(np.asarray(a) - bn).max()))
            scale = max(scale, float(np.abs(bn).max()))
    row("parity", "discriminator scores max|d|", e_s, None, unit="err", note=f"{len(s_r)} sub-discriminators")
    row("parity", "discriminator fmaps max|d|", e_f, None, unit="err", note=f"rel {e_f / max(scale, 1e-12):.1e}")
    del tg, td


# ------------------------------------------------------------------- 2. train step


def _torch_sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def torch_step_timing(cfg, tiny, dev, B, T, seg, steps, fp16):
    import torch
    from bench_train import rvc_step
    from rvc.lib.train.mel_processing import spectrogram_torch

    g, d = torch_models(cfg.replace(segment_size=seg), tiny, dev)
    g.train()
    d.train()
    og = torch.optim.AdamW(g.parameters(), 1e-4, betas=(0.8, 0.99), eps=1e-9)
    od = torch.optim.AdamW(d.parameters(), 1e-4, betas=(0.8, 0.99), eps=1e-9)
    b = {k: torch.from_numpy(v).to(dev) for k, v in batch_np(B, T).items()}
    b["pitch"], b["sid"] = b["pitch"].long(), b["sid"].long()
    spec = spectrogram_torch(b["wave"], 2048, 40000, 400, 2048)
    spec_len = torch.full((B,), spec.shape[-1], device=dev)
    step = rvc_step(g, d, og, od, b, spec, spec_len, seg, fp16=fp16)  # RVC's fp16_run: autocast + GradScaler

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    _torch_sync(dev)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _torch_sync(dev)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    del g, d, og, od
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), first, peak


def jax_step_timing(cfg, tiny, B, T, seg, steps, dtype):
    import jax
    import numpy as np

    from rvclora_jax.audio import MelConfig
    from rvclora_jax.train import TrainConfig, Trainer

    g, d = jax_models(cfg, tiny, dtype=dtype)
    tr = Trainer(g, d, TrainConfig(batch_size=B, segment_frames=seg), steps_per_epoch=100)
    b = batch_np(B, T)
    b["spec"] = np.asarray(jax.jit(MelConfig.for_rate(40000).spectrogram)(b["wave"]))
    b["spec_lengths"] = np.full((B,), b["spec"].shape[1], np.int32)
    b["phone_lengths"] = b["spec_lengths"]
    state = tr.init_state()
    placed = tr.put_batch(b)
    t0 = time.perf_counter()
    # the step's arguments: state (donated), the placed batch, the frozen base (an argument,
    # not a constant baked into the program)
    compiled = tr._step.lower(state, placed, tr.frozen).compile()
    compile_s = time.perf_counter() - t0
    footprint = None
    try:
        ma = compiled.memory_analysis()
        footprint = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
                     - ma.alias_size_in_bytes) / 2**30
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    t0 = time.perf_counter()
    state, m = compiled(state, placed, tr.frozen)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, placed, tr.frozen)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    loss = float(m["loss_g"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"loss_g {loss}")
    return statistics.median(times), compile_s, first, footprint, loss


def steps_section(cfg, tiny, dev, have_ref, batches, T, seg, steps):
    import jax
    import jax.numpy as jnp

    for B in batches:
        res = {}
        for name, dtype in (("fp32", None), ("bf16", jnp.bfloat16)):
            try:
                res[name] = jax_step_timing(cfg, tiny, B, T, seg, steps, dtype)
            except Exception as e:  # noqa: BLE001 - reported in the table
                res[name] = e
        tres = {}
        for name, fp16 in (("fp32", False), ("fp16", True)):
            if not have_ref:
                tres[name] = None
                continue
            try:
                tres[name] = torch_step_timing(cfg, tiny, dev, B, T, seg, steps, fp16)
            except Exception as e:  # noqa: BLE001
                tres[name] = e
        for jn, tn in (("fp32", "fp32"), ("bf16", "fp16")):
            j, t = res[jn], tres[tn]
            jerr = f"jax {jn} failed: {type(j).__name__}: {str(j).splitlines()[0][:90]}" if isinstance(j, Exception) \
                else ""
            terr = f"torch {tn} failed: {type(t).__name__}: {str(t).splitlines()[0][:90]}" if isinstance(t, Exception) \
                else ""
            jt = None if isinstance(j, Exception) else j[0] * 1e3
            tt = None if not isinstance(t, tuple) else t[0] * 1e3
            label = f"B={B} jax {jn} / torch {tn}{' autocast+GradScaler' if tn == 'fp16' else ''}"
            row("step", f"{label}: step", jt, tt, unit="ms", note="; ".join(x for x in (jerr, terr) if x))
            row("step", f"{label}: steps/s", None if jt is None else 1e3 / jt, None if tt is None else 1e3 / tt)
            if jt is not None:
                row("compile", f"{label}: compile / first step", j[1], None if tt is None else t[1], unit="s",
                    note="jax: lower+compile; torch: first step (cuDNN autotune, allocator)")
                row("memory", f"{label}: peak device memory", j[3], None if tt is None else t[2], unit="GiB",
                    note="jax: compiled step footprint (memory_analysis); torch: max_memory_allocated")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row("memory", "jax process peak (all rows)", stats["peak_bytes_in_use"] / 2**30, None, unit="GiB")


# ------------------------------------------------------------------- 3. convolutions


def collect_convs(cfg, tiny, dev, B, T, seg):
    """Distinct convolutions of the training forward (G on a batch, D on real+generated):
    ``{key: (torch module, input shape)}`` from forward hooks."""
    import torch

    g, d = torch_models(cfg.replace(segment_size=seg), tiny, dev)
    g.train()
    b = {k: torch.from_numpy(v).to(dev) for k, v in batch_np(B, T).items()}
    b["pitch"], b["sid"] = b["pitch"].long(), b["sid"].long()
    from rvc.lib.train.mel_processing import spectrogram_torch

    spec = spectrogram_torch(b["wave"], 2048, 40000, 400, 2048)
    found = {}

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0]
            w = mod.weight
            key = (type(mod).__name__, tuple(x.shape), tuple(w.shape), mod.stride, mod.padding, mod.dilation,
                   mod.groups)
            found.setdefault(key, name)
        return fn

    hs = []
    for prefix, m in (("g", g), ("d", d)):
        for name, mod in m.named_modules():
            if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose1d)):
                hs.append(mod.register_forward_hook(hook(f"{prefix}.{name}")))
    with torch.no_grad():
        y_hat = g(b["phone"], b["phone_lengths"], b["pitch"], b["pitchf"], spec,
                  torch.full((B,), spec.shape[-1], device=dev), b["sid"])[0]
        d(y_hat, y_hat)
    for h in hs:
        h.remove()
    return found


def _time(fn, reps, sync):
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def conv_section(cfg, tiny, dev, have_ref, B, T, seg, reps, limit):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from rvclora_jax.layers import Conv1d, ConvTranspose1d

    found = collect_convs(cfg, tiny, dev, B, T, seg)
    keys = sorted(found, key=lambda k: -int(np.prod(k[1])) * int(np.prod(k[2])))[:limit] if limit else list(found)
    row("conv", f"{len(found)} distinct convolutions in the step", None, None,
        note=f"timed {len(keys)}" + ("" if len(keys) == len(found) else f" largest (--conv-limit {limit})"))
    flagged = 0
    for key in keys:
        kind, xs, ws, stride, pad, dil, groups = key
        name = found[key]
        s, p, dl = stride[0], pad[0], dil[0]
        if kind == "Conv2d":  # DiscriminatorP (K, 1) kernels: JAX folds the period axis into the batch
            Bt, C, H, P = xs
            jx_shape = (Bt * P, H, C)
            layer = Conv1d(ws[1] * groups, ws[0], ws[2], stride=s, padding=p, dilation=dl, groups=groups,
                           torch_kx1=True, rngs=nnx.Rngs(0))
        elif kind == "Conv1d":
            jx_shape = (xs[0], xs[2], xs[1])
            layer = Conv1d(ws[1] * groups, ws[0], ws[2], stride=s, padding=p, dilation=dl, groups=groups,
                           rngs=nnx.Rngs(0))
        else:
            jx_shape = (xs[0], xs[2], xs[1])
            layer = ConvTranspose1d(ws[0], ws[1], ws[2], stride=s, padding=p, dilation=dl, rngs=nnx.Rngs(0))
        gdef, params = nnx.split(layer)
        x = jax.random.normal(jax.random.key(0), jx_shape, jnp.float32)

        def apply(pr, xx):
            return nnx.merge(gdef, pr)(xx)

        y = jax.jit(apply)(params, x)
        gy = jnp.ones_like(y)
        fwd = jax.jit(apply)
        dx = jax.jit(lambda pr, xx, gg: jax.vjp(lambda z: apply(pr, z), xx)[1](gg)[0])
        dw = jax.jit(lambda pr, xx, gg: jax.vjp(lambda q: apply(q, xx), pr)[1](gg)[0])
        jsync = lambda: None  # noqa: E731 - block_until_ready inside the timed calls
        j = [_time(lambda f=f: jax.block_until_ready(f(params, x, gy) if f is not fwd else f(params, x)), reps, jsync)
             for f in (fwd, dx, dw)]
        t = [None, None, None]
        if have_ref:
            mod = torch.nn.Module()
            tconv = {"Conv1d": torch.nn.Conv1d, "Conv2d": torch.nn.Conv2d}.get(kind)
            if tconv is not None:
                k2 = ws[2] if kind == "Conv1d" else (ws[2], ws[3])
                mod = tconv(ws[1] * groups, ws[0], k2, stride=stride, padding=pad, dilation=dil, groups=groups)
            else:
                mod = torch.nn.ConvTranspose1d(ws[0], ws[1], ws[2], stride=stride, padding=pad, dilation=dil)
            mod = mod.to(dev)
            xt = torch.randn(xs, device=dev, requires_grad=True)
            with torch.no_grad():
                go = torch.ones_like(mod(xt))
            ts = lambda: _torch_sync(dev)  # noqa: E731

            def t_fwd():
                with torch.no_grad():
                    mod(xt)

            def t_dx():
                torch.autograd.grad(mod(xt), xt, go)

            def t_dw():
                torch.autograd.grad(mod(xt), mod.weight, go)

            t = [_time(f, reps, ts) for f in (t_fwd, t_dx, t_dw)]
            # torch's dx / dw include its own forward; subtract it (JAX's vjp keeps the forward too)
            t = [t[0], max(t[1] - t[0], 1e-6), max(t[2] - t[0], 1e-6)]
            j = [j[0], max(j[1] - j[0], 1e-6), max(j[2] - j[0], 1e-6)]
        desc = (f"{name} {kind} x{list(xs)} w{list(ws)} s{s} p{p} d{dl} g{groups}")
        for part, jv, tv in zip(("fwd", "dx", "dw"), j, t):
            slow = tv is not None and jv > 2 * tv
            flagged += slow
            row("conv", f"{desc} {part}", jv, tv, unit="ms", note="SLOW >2x torch" if slow else "")
    row("conv", "ops more than 2x slower than torch", flagged, None, note="see SLOW rows" if flagged else "")


# ------------------------------------------------------------------- main


def infer_section(tiny, dev):
    """``rvclora infer``'s pipeline vs RVC's own ``Pipeline.pipeline`` on the same files
    (``benchmarks/bench_vc.py``: random weights in the real layouts, a 30 s speech input,
    rmvpe; the index on both sides when faiss is there to read it for RVC)."""
    import tempfile

    import bench_vc

    seconds, steady = (2.0, 1) if tiny else (30.0, 2)
    work = tempfile.mkdtemp(prefix="device_check_vc_")
    use_index = importlib.util.find_spec("faiss") is not None  # before bench_vc stands in for it
    bench_vc.prepare(work, seconds)
    if not use_index:
        NOTES.append("infer: faiss missing, so RVC cannot read the index: retrieval off on both sides")
    j = bench_vc.run_jax(work, "rmvpe", use_index, steady)
    t = bench_vc.run_torch(work, "rmvpe", use_index, steady, device=str(dev))
    label = f"{seconds:.0f} s input, rmvpe, index {'on' if use_index else 'off'}"
    row("infer", f"{label}: first conversion (JAX: compiling)", j["first_wall"], t["first_wall"], unit="s")
    row("infer", f"{label}: steady conversion", j["steady_wall"], t["steady_wall"], unit="s")
    row("infer", "real-time factor, steady (s per s of audio)", j["steady_wall"] / seconds,
        t["steady_wall"] / seconds)
    row("infer", "output samples", j["out_samples"], t["out_samples"],
        note="" if j["out_samples"] == t["out_samples"] else "LENGTHS DIFFER")


# ------------------------------------------------------------------- 5. front end


def _first_and_steady(call, reps):
    """``(first call s, median of reps calls s, the first call's result)``. Every call ends
    with its results on the host (numpy), so no separate device sync is needed."""
    t0 = time.perf_counter()
    out = call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def _frontend_model(item, what, label, jax_call, torch_call, batches, reps, compare, dev, ref_note=""):
    """Time ``jax_call(B)`` / ``torch_call(B)`` (None: no reference) at each batch size and
    report; ``compare(B, jax_out, torch_out) -> [(ours, theirs), ...]`` are the arrays whose
    max |Δ| is the parity row (over every clip of every batch size)."""
    import numpy as np

    err, scale, n, res = 0.0, 0.0, 0, {}
    for B in batches:
        jf, js, jo = _first_and_steady(lambda: jax_call(B), reps)
        tf = ts = None
        if torch_call is not None:
            tf, ts, to = _first_and_steady(lambda: torch_call(B), reps)
            for a, b in compare(B, jo, to):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                if a.shape != b.shape:
                    raise ValueError(f"{item} B={B}: shapes differ, jax {a.shape} vs torch {b.shape}")
                err, scale, n = max(err, float(np.abs(a - b).max())), max(scale, float(np.abs(b).max())), n + 1
        res[B] = (jf, js, tf, ts)
    if torch_call is not None:
        row("frontend", f"{item}: {what} max|d|", err, None, unit="err",
            note=f"rel {err / max(scale, 1e-12):.1e}; {n} clips, {label}; fp32, TF32 off, precision=highest")
    for B, (jf, js, tf, ts) in res.items():
        row("frontend", f"{item} B={B}: first call", jf, tf, unit="s",
            note="jax: includes compile" + ("; torch: cuDNN autotune" if tf is not None and dev.type == "cuda" else "")
            + ref_note)
        row("frontend", f"{item} B={B}: steady", js * 1e3, None if ts is None else ts * 1e3, unit="ms",
            note=f"median of {reps}; {label}{ref_note}")


def _frontend_hubert(tiny, dev, have, batches, reps):
    import bench_frontend_hubert as BH

    from rvclora_jax.frontend.hubert import ContentFeatures

    seconds = 0.5 if tiny else 3.7
    hf = None
    if have["torch"] and have["transformers"]:
        hf, jm = BH.same_weight_pair(BH.tiny_hf_config() if tiny else None)
        hf = hf.to(dev)
        attn = getattr(hf.config, "_attn_implementation", None)
        ref_note = f"; HF attention: {attn}" if attn else ""
    else:
        from flax import nnx

        from rvclora_jax.frontend.hubert import Hubert, HubertConfig

        cfg = HubertConfig()
        if tiny:
            cfg = HubertConfig(conv_layers=((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2, hidden_size=32,
                               num_layers=2, num_heads=4, intermediate_size=64, conv_pos=16, conv_pos_groups=4)
        jm = Hubert(cfg, rngs=nnx.Rngs(0))
        ref_note = "; no torch/transformers: JAX only, random weights"
    feats = ContentFeatures(jm, "v2", batch_size=max(batches))
    wavs = BH.clips(max(batches), seconds)
    _frontend_model(
        "hubert" + ("" if tiny else "-base") + " v2 (layer 12)", "features",
        f"{seconds:g} s clips" + (", TINY (32 wide, 2 layers)" if tiny else ""),
        lambda B: feats.batch(list(wavs[:B])),
        None if hf is None else (lambda B: BH.torch_features(hf, wavs[:B], dev)),
        batches, reps, lambda B, jo, to: zip(jo, to), dev, ref_note)
    del hf, jm, feats


def _frontend_rmvpe(tiny, dev, have, batches, reps):
    import tempfile
    import warnings

    import bench_frontend_rmvpe as BR

    from rvclora_jax.frontend.rmvpe import RMVPEPitch

    seconds = 0.5 if tiny else 2.0
    layout = BR.TINY if tiny else None
    ref = None
    if have["torch"] and have["rvc"]:
        from rvclora_convert.rmvpe import load_rmvpe

        with tempfile.TemporaryDirectory(prefix="device_check_rmvpe_") as tmp:
            path = os.path.join(tmp, "rmvpe.pt")
            BR.write_fake(path, layout)
            ref = BR.rvc_reference(path, str(dev), layout)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # not the official rmvpe.pt: of course
                model = load_rmvpe(path, check_hash=False)
        ref_note = ""
    else:
        from flax import nnx

        from rvclora_jax.frontend.rmvpe import RMVPE, RMVPEConfig

        model = RMVPE(RMVPEConfig(**layout) if layout else RMVPEConfig(), rngs=nnx.Rngs(0))
        ref_note = "; no torch/rvc: JAX only, random weights"
    pitch = RMVPEPitch(model, batch_size=max(batches))
    wavs = BR.clips(max(batches), seconds)
    _frontend_model(
        "rmvpe", "salience", f"{seconds:g} s clips" + (", TINY U-Net" if tiny else "") + ", f0 decoded",
        lambda B: BR.jax_pitch(pitch, wavs[:B]),
        None if ref is None else (lambda B: BR.torch_pitch(ref, wavs[:B])),
        batches, reps, lambda B, jo, to: zip(jo[0], to[0]), dev, ref_note)
    del ref, model, pitch


def _frontend_fcpe(tiny, dev, have, batches, reps):
    import numpy as np

    import bench_frontend_fcpe as BF
    from bench_frontend_rmvpe import clips

    seconds = 0.5 if tiny else 2.0
    ref, why = None, ""
    if not have["torch"]:
        why = "torch missing"
    elif not have["torchfcpe"]:
        why = "torchfcpe not installed"
    else:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # torchfcpe prints [INFO] lines: keep stdout the table's
                ref = BF.torch_reference(str(dev))
        except Exception as e:  # noqa: BLE001 - then the JAX side alone
            why = f"torchfcpe not importable ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    wavs = clips(max(batches), seconds)
    if ref is not None:
        from rvclora_convert.fcpe import bundled_checkpoint

        pitch = BF.jax_pitch(bundled_checkpoint(), max_batch=max(batches))
        label, ref_note = f"{seconds:g} s clips, bundled fcpe_c_v001.pt both sides", ""
        import torch

        def torch_call(B):
            return BF.torch_f0(ref, torch.from_numpy(np.stack(wavs[:B]))).float().cpu().numpy()

        def compare(B, jo, to):  # the salience: one more call each side (the programs are compiled)
            return zip((t[2] for t in pitch.analyse_batch(wavs[:B])), BF.torch_salience(ref, wavs[:B]))
    else:
        from rvclora_jax.frontend.fcpe import FCPEConfig

        pitch = BF.jax_pitch(None, FCPEConfig(hidden_dims=32, n_layers=1) if tiny else None,
                             max_batch=max(batches))
        label = f"{seconds:g} s clips, random weights" + (", TINY (32 wide, 1 layer)" if tiny else "")
        ref_note = f"; {why}: JAX only (no PyTorch FCPE to compare)"
        torch_call = compare = None
    _frontend_model("fcpe", "salience", label, lambda B: pitch.batch(wavs[:B]), torch_call, batches, reps,
                    compare, dev, ref_note)
    del ref, pitch


def frontend_section(tiny, dev, have, batches, reps, parts):
    """Section 5: each front-end model in turn; one failing model is a FAILED row, the
    others still run."""
    for name, fn in (("hubert", _frontend_hubert), ("rmvpe", _frontend_rmvpe), ("fcpe", _frontend_fcpe)):
        if name not in parts:
            row("frontend", f"{name}: skipped", note="--skip")
            continue
        t0 = time.perf_counter()
        try:
            fn(tiny, dev, have, batches, reps)
        except Exception as e:  # noqa: BLE001 - reported in the table
            first = str(e).splitlines()[0][:160] if str(e) else ""
            row("frontend", f"{name}: FAILED", note=f"{type(e).__name__}: {first}")
            traceback.print_exc()
        print(f"[device_check] frontend {name}: {time.perf_counter() - t0:.1f} s wall", file=sys.stderr, flush=True)
        if dev is not None and dev.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", choices=["gpu", "cuda", "cpu", "tpu"], default=None,
                    help="JAX platform (default: JAX's choice, i.e. the GPU when jax[cuda] sees one)")
    ap.add_argument("--tiny", action="store_true", help="narrow models, small shapes (CPU dry run)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 8,16; tiny: 2)")
    ap.add_argument("--frames", type=int, default=None, help="padded utterance frames (default 200; tiny: 24)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; tiny: 2)")
    ap.add_argument("--conv-reps", type=int, default=None, help="timed calls per conv op (default 10; tiny: 2)")
    ap.add_argument("--conv-limit", type=int, default=None, help="time only the N largest convs (default all; tiny: 4)")
    ap.add_argument("--frontend-reps", type=int, default=None,
                    help="timed steady calls per front-end row (default 5; tiny: 2)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: parity,step,conv,infer,frontend; "
                                               "or front-end models: hubert,rmvpe,fcpe")
    ap.add_argument("--pretend-missing", default="",
                    help="comma-separated modules to treat as not installed (e.g. librosa,torchfcpe: dry-run what "
                         "a bare GPU machine does)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    known = {"parity", "step", "conv", "infer", "frontend", *FRONTEND_PARTS}
    if skip - known:
        ap.error(f"--skip: unknown {', '.join(sorted(skip - known))} (known: {', '.join(sorted(known))})")
    PRETEND_MISSING.update(filter(None, args.pretend_missing.split(",")))
    if PRETEND_MISSING:
        NOTES.append(f"--pretend-missing: {', '.join(sorted(PRETEND_MISSING))} treated as not installed")
    t_start = time.perf_counter()
    have = setup_environment(args)
    tiny = args.tiny
    batches = [int(x) for x in (args.batches or ("2" if tiny else "8,16")).split(",")]
    T = args.frames or (24 if tiny else 200)
    seg = 8 if tiny else 32
    steps = args.steps or (2 if tiny else 10)
    reps = args.conv_reps or (2 if tiny else 10)
    conv_limit = args.conv_limit if args.conv_limit is not None else (4 if tiny else 0)
    frontend_reps = args.frontend_reps or (2 if tiny else 5)
    frontend_parts = [p for p in FRONTEND_PARTS if p not in skip]
    describe_devices(have)
    have_ref = have["torch"] and have["rvc"]
    dev = None
    if have["torch"]:
        import torch

        # fp32 means fp32 on both sides: no TF32 in cuDNN convs or cuBLAS matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        import jax

        on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
        dev = torch.device("cuda" if on_gpu else "cpu")
        if jax.devices()[0].platform == "gpu" and not torch.cuda.is_available():
            NOTES.append("torch sees no CUDA device: the PyTorch columns ran on the CPU")
    cfg = config(tiny)
    NOTES.append(f"v2 40k f0 {'TINY (narrow channels, 1 attention layer, D periods 2)' if tiny else 'real size'}; "
                 f"{T} frames, segment {seg} frames; JAX trains a LoRA r8 adapter + D, torch the full G + D")
    for name, fn in (("parity", lambda: parity(cfg, tiny, dev)),
                     ("step", lambda: steps_section(cfg, tiny, dev, have_ref, batches, T, seg, steps)),
                     ("conv", lambda: conv_section(cfg, tiny, dev, have_ref, batches[0], T, seg, reps,
                                                   conv_limit)),
                     ("infer", lambda: infer_section(tiny, dev)),
                     ("frontend", lambda: frontend_section(tiny, dev, have, (1, 8), frontend_reps, frontend_parts))):
        if name in skip or (name == "parity" and not have_ref):
            row(name, "skipped", note="--skip" if name in skip else "no PyTorch reference")
            continue
        if name == "infer" and not (have_ref and importlib.util.find_spec("transformers")):
            row(name, "skipped", note="needs torch, rvc and transformers for RVC's pipeline")
            continue
        if name == "conv" and not have_ref:
            row(name, "skipped", note="the conv list comes from the PyTorch models' hooks")
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        print(f"[device_check] {name} ...", file=sys.stderr, flush=True)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            row(name, "FAILED", note=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            traceback.print_exc()
        print(f"[device_check] {name}: {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU",
              file=sys.stderr, flush=True)
    row("env", "wall time of this check", time.perf_counter() - t_start, None, unit="s")
    print_table()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": ROWS, "notes": NOTES}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
