"""Loading pretraining checkpoints into downstream networks.

Reusable pieces used by the finetuning and classification trainers:

* `transfer_weights`       encoder(+stem)-only or full loading, with a report of every key
* `adapt_input_channels`   stem kernel repeated over channels and divided by their count
* `interpolate_pos_embed`  trilinear resampling of a learned positional embedding on its 3D token grid
* `WarmupPolyLR`           linear warm-up then poly decay, per param group (epoch-based, nnU-Net style)
* the `-pretrained_weights` ownership seam (`register_pretrained_owner`), see docs/finetuning.md

Keys are dynamic-network-architectures module names; a pretraining network is a superset of the
downstream network, so a key means the same thing on both sides.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.common.adaptation import ADAPTATION_PLAN_KEY, BACKBONE_KEYS, AdaptationPlan
from nnssl_plugins.pretrain.common.networks import strip_wrapper_prefixes, unwrap_network

# keys never transferred (segmentation heads depend on the number of classes), as in stock nnU-Net
HEAD_KEY_PATTERNS = (".seg_layers.",)


# ----------------------------------------------------------------------------------------------------------------
# network helpers
# ----------------------------------------------------------------------------------------------------------------
def canonical_state(module: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """State tensors of `module` by key, plus a map alias -> canonical key for shared tensors.

    dynamic-network-architectures keeps aliases (e.g. `decoder.encoder.*` is `encoder.*`, and
    `...convs.0.all_modules.0` is `...convs.0.conv`); we load each tensor once, under its first name.
    """
    sd = module.state_dict(keep_vars=True)
    canonical: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[int, str] = {}
    for k, v in sd.items():
        if v is None:
            continue
        ident = id(v)
        if ident in seen:
            aliases[k] = seen[ident]
        else:
            seen[ident] = k
            canonical[k] = v
    return canonical, aliases


def backbone_keys(arch_name: str) -> dict:
    """Default encoder/stem/in-proj/pos-emb keys for a dynamic-network-architectures class name."""
    short = arch_name.split(".")[-1]
    if short not in BACKBONE_KEYS:
        raise UserInputError(
            f"architecture '{arch_name}': not supported for finetuning (supported: {sorted(BACKBONE_KEYS)}). "
            f"Use a checkpoint of one of our pretraining methods and plans written by nnssl_transfer_plans."
        )
    return dict(BACKBONE_KEYS[short])


def encoder_prefixes(keys: dict) -> List[str]:
    return [p for p in (keys.get("key_to_stem"), keys.get("key_to_encoder")) if p]


def _has_prefix(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def freeze_prefixes(network: nn.Module, prefixes: Sequence[str]) -> int:
    """Set requires_grad=False on every parameter under the given module prefixes; returns the count."""
    n = 0
    for name, p in unwrap_network(network).named_parameters():
        if _has_prefix(name, prefixes):
            p.requires_grad_(False)
            n += 1
    return n


# ----------------------------------------------------------------------------------------------------------------
# adaptations
# ----------------------------------------------------------------------------------------------------------------
def adapt_input_channels(weight: torch.Tensor, num_target_channels: int) -> torch.Tensor:
    """(out, c_src, *k) -> (out, c_tgt, *k): sum over source channels, repeat, divide by c_tgt.

    For c_src == 1 this is "repeat the kernel over channels and divide by their count"; in general the
    response to an input that replicates one image over all channels is unchanged.
    """
    summed = weight.sum(dim=1, keepdim=True)
    reps = [1] * weight.ndim
    reps[1] = num_target_channels
    return summed.repeat(*reps) / num_target_channels


def _grid_for(n_tokens: int, hint: Optional[Sequence[int]]) -> Optional[Tuple[int, ...]]:
    if hint is not None and int(math.prod(hint)) == n_tokens:
        return tuple(int(i) for i in hint)
    c = round(n_tokens ** (1 / 3))
    for cand in (c - 1, c, c + 1):
        if cand > 0 and cand ** 3 == n_tokens:
            return (cand,) * 3
    return None


def interpolate_pos_embed(pos_embed: torch.Tensor, src_grid: Sequence[int], tgt_grid: Sequence[int],
                          num_prefix_tokens: int = 0) -> torch.Tensor:
    """(1, P + prod(src_grid), C) -> (1, P + prod(tgt_grid), C), trilinear on the token grid.

    Token order is Primus' `b c w h d -> b (w h d) c` (row-major over the grid); prefix (register)
    tokens are kept as they are.
    """
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    b, n, c = grid_tokens.shape
    assert n == math.prod(src_grid), (n, src_grid)
    x = grid_tokens.reshape(b, *src_grid, c).permute(0, 4, 1, 2, 3).float()
    x = nn.functional.interpolate(x, size=tuple(int(i) for i in tgt_grid), mode="trilinear", align_corners=False)
    x = x.permute(0, 2, 3, 4, 1).reshape(b, -1, c).to(pos_embed.dtype)
    return torch.cat([prefix, x], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# checkpoint reading
# ----------------------------------------------------------------------------------------------------------------
def read_pretrained_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[AdaptationPlan]]:
    """(network_weights, typed adaptation plan or None) of a checkpoint file, loaded weights_only.

    Reads checkpoints of nnssl_plugins (current and older layout), of DKFZ nnssl, nnU-Net checkpoints and bare
    state dicts (the last two without a plan)."""
    from nnssl_plugins.utils.io import safe_torch_load

    ckpt = safe_torch_load(path, map_location="cpu")
    if isinstance(ckpt, dict) and "network_weights" in ckpt:
        weights = ckpt["network_weights"]
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()) and ckpt:
        weights = ckpt  # a bare state dict
    else:
        raise UserInputError(
            f"{path}: has no 'network_weights' entry. Pass a checkpoint written by nnU-Net / nnssl_plugins "
            f"(checkpoint_final.pth)."
        )
    weights = strip_wrapper_prefixes(weights)  # saved from DDP / torch.compile networks
    raw = ckpt.get(ADAPTATION_PLAN_KEY) if isinstance(ckpt, dict) and "network_weights" in ckpt else None
    return weights, None if raw is None else AdaptationPlan.from_dict(raw, path)


# ----------------------------------------------------------------------------------------------------------------
# transfer + report
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TransferReport:
    source: str
    mode: str
    loaded: List[Tuple[str, Tuple[int, ...]]] = field(default_factory=list)
    adapted: List[Tuple[str, Tuple[int, ...], Tuple[int, ...], str]] = field(default_factory=list)
    fresh: List[Tuple[str, str]] = field(default_factory=list)          # target keys left at init
    skipped: List[Tuple[str, str]] = field(default_factory=list)        # checkpoint keys not used

    def format(self, verbose: bool = True) -> str:
        lines = [f"nnssl pretrained weights from {self.source} (mode: {self.mode}): "
                 f"{len(self.loaded)} loaded, {len(self.adapted)} adapted, {len(self.fresh)} kept fresh, "
                 f"{len(self.skipped)} checkpoint keys skipped"]
        if self.adapted:
            lines.append("adapted:")
            lines += [f"  {k}: {tuple(a)} -> {tuple(b)} ({how})" for k, a, b, how in self.adapted]
        if verbose:
            lines.append("loaded:")
            lines += [f"  {k} {tuple(s)}" for k, s in self.loaded]
            lines.append("kept fresh (not loaded):")
            lines += [f"  {k} ({why})" for k, why in self.fresh]
            lines.append("checkpoint keys skipped:")
            lines += [f"  {k} ({why})" for k, why in self.skipped]
        return "\n".join(lines)


def _incompatible(source: str, key: str, ckpt_shape, net_shape, fix: str) -> UserInputError:
    return UserInputError(
        f"{source}: key '{key}' has shape {tuple(ckpt_shape)} in the checkpoint but {tuple(net_shape)} in the "
        f"network being trained, and this cannot be adapted. {fix}"
    )


DEFAULT_FIX = ("The target plans must use the checkpoint's architecture: run `nnssl_transfer_plans -d <target> "
               "-ckpt <checkpoint>`, then `nnUNetv2_preprocess -d <target> -plans_name <those plans>` and train with "
               "`-p <those plans>`.")


@torch.no_grad()
def transfer_weights(network: nn.Module, source_weights: Dict[str, torch.Tensor], *, mode: str = "encoder",
                     backbone: dict, plan: Optional[AdaptationPlan] = None,
                     target_token_grid: Optional[Sequence[int]] = None, source: str = "checkpoint",
                     fix: str = DEFAULT_FIX) -> TransferReport:
    """Copy checkpoint tensors into `network` in place (optimizer references stay valid).

    mode 'encoder': stem + encoder only (everything else keeps its fresh initialization);
    mode 'full': every key that exists on both sides (segmentation heads excepted).
    `backbone`: dict with key_to_encoder/key_to_stem/keys_to_in_proj/key_to_lpe (network side names);
    the checkpoint's adaptation plan, when given, may add in-proj / pos-emb keys and gives the pretraining token
    grid of a learned positional embedding (pretraining patch size // patch_embed_size).
    Encoder keys that are missing or mismatched and not adaptable raise UserInputError naming the key,
    both shapes and `fix`.
    """
    assert mode in ("encoder", "full"), mode
    mod = unwrap_network(network)
    target, aliases = canonical_state(mod)
    enc_prefixes = encoder_prefixes(backbone)
    in_proj = {k + ".weight" for k in backbone.get("keys_to_in_proj") or []}
    lpe = backbone.get("key_to_lpe")
    if plan is not None:
        in_proj |= {k + ".weight" for k in plan.keys_to_in_proj}
        lpe = lpe or plan.key_to_lpe
    # resolve in-proj alias names to the canonical ones
    in_proj = {aliases.get(k, k) for k in in_proj}
    report = TransferReport(source=source, mode=mode)
    used_source = set()

    # make source aliases resolvable: a target canonical key may only exist under an alias in the source
    def find_src(key: str) -> Optional[str]:
        if key in source_weights:
            return key
        for alias, canon in aliases.items():
            if canon == key and alias in source_weights:
                return alias
        return None

    if not any(find_src(k) for k in target if _has_prefix(k, enc_prefixes)):
        sample = [k for k in target if _has_prefix(k, enc_prefixes)][:1]
        raise UserInputError(
            f"{source}: none of the network's encoder keys ({', '.join(enc_prefixes)}.*, e.g. '{sample[0] if sample else '?'}') "
            f"exist in the checkpoint (its keys start with {sorted({k.split('.')[0] for k in source_weights})[:6]}). "
            f"The checkpoint comes from an incompatible architecture: use nnsslFinetuneTrainer / nnsslClsTrainer for "
            f"ResidualEncoderUNet checkpoints (MASS, MDAE) and nnsslPrimusFinetuneTrainer for Primus checkpoints "
            f"(Hi-End-MAE, MAESIL), with plans from nnssl_transfer_plans."
        )

    for key, tensor in target.items():
        in_encoder = _has_prefix(key, enc_prefixes)
        if any(p in key for p in HEAD_KEY_PATTERNS):
            report.fresh.append((key, "segmentation head"))
            continue
        if mode == "encoder" and not in_encoder:
            report.fresh.append((key, "not part of the encoder (encoder-only loading)"))
            continue
        skey = find_src(key)
        if skey is None:
            if in_encoder:
                raise UserInputError(
                    f"{source}: encoder key '{key}' (shape {tuple(tensor.shape)} in the network) is missing from the "
                    f"checkpoint. The checkpoint's encoder differs from the network's. {fix}"
                )
            report.fresh.append((key, "not in checkpoint"))
            continue
        src = source_weights[skey]
        used_source.add(skey)
        if tuple(src.shape) == tuple(tensor.shape):
            tensor.copy_(src.to(tensor.dtype))
            report.loaded.append((key, tuple(src.shape)))
            continue
        # adaptable mismatches
        if key in in_proj and src.ndim == tensor.ndim and src.shape[0] == tensor.shape[0] and \
                tuple(src.shape[2:]) == tuple(tensor.shape[2:]):
            tensor.copy_(adapt_input_channels(src.float(), tensor.shape[1]).to(tensor.dtype))
            report.adapted.append((key, tuple(src.shape), tuple(tensor.shape),
                                   f"input channels {src.shape[1]} -> {tensor.shape[1]}: summed over channels, "
                                   f"repeated, divided by {tensor.shape[1]}"))
            continue
        if lpe is not None and key == lpe and src.ndim == 3 and src.shape[0] == 1 and src.shape[2] == tensor.shape[2]:
            n_prefix = int(getattr(getattr(mod, "eva", None), "num_prefix_tokens", 0) or 0)
            src_grid = _grid_for(src.shape[1] - n_prefix, None if plan is None else plan.source_token_grid())
            tgt_grid = _grid_for(tensor.shape[1] - n_prefix, target_token_grid)
            if src_grid is None or tgt_grid is None:
                raise _incompatible(source, key, src.shape, tensor.shape,
                                    "The token grid of the positional embedding could not be determined: the "
                                    "checkpoint needs an adaptation plan with its pretraining patch size.")
            tensor.copy_(interpolate_pos_embed(src, src_grid, tgt_grid, n_prefix).to(tensor.dtype))
            report.adapted.append((key, tuple(src.shape), tuple(tensor.shape),
                                   f"positional embedding grid {src_grid} -> {tgt_grid}, trilinear"))
            continue
        if in_encoder:
            raise _incompatible(source, key, src.shape, tensor.shape, fix)
        report.fresh.append((key, f"shape mismatch: checkpoint {tuple(src.shape)}, network {tuple(tensor.shape)}"))

    alias_keys = set(aliases)
    for k in source_weights:
        if k in used_source or k in alias_keys:
            continue
        if mode == "encoder" and k in target and not _has_prefix(k, enc_prefixes):
            report.skipped.append((k, "not part of the encoder (encoder-only loading)"))
        elif k in target:
            report.skipped.append((k, "segmentation head / not loaded"))
        else:
            report.skipped.append((k, "not in the downstream network (pretraining-only part)"))
    return report


def load_pretrained_into(network: nn.Module, path: str, *, mode: str, backbone: dict,
                         expected_arch: Optional[str] = None, target_token_grid: Optional[Sequence[int]] = None,
                         log: Callable[[str], None] = print) -> TransferReport:
    """Read `path`, check the architecture recorded in its plan, transfer, and log the report."""
    weights, plan = read_pretrained_checkpoint(path)
    if plan is not None and expected_arch is not None:
        if plan.backbone_class() != expected_arch.split(".")[-1]:
            raise UserInputError(
                f"{path}: the checkpoint was pretrained with architecture '{plan.architecture_plans.arch_class_name}'"
                f" (downstream: {plan.backbone_class()}), but this trainer builds "
                f"'{expected_arch}'. Use nnsslFinetuneTrainer/nnsslClsTrainer for ResidualEncoderUNet checkpoints "
                f"and nnsslPrimusFinetuneTrainer/nnsslPrimusClsTrainer for Primus checkpoints, with target plans "
                f"written by nnssl_transfer_plans."
            )
    report = transfer_weights(network, weights, mode=mode, backbone=backbone, plan=plan,
                              target_token_grid=target_token_grid, source=path)
    log(report.format(verbose=True))
    return report


# ----------------------------------------------------------------------------------------------------------------
# -pretrained_weights ownership seam
# ----------------------------------------------------------------------------------------------------------------
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _dispatching_load_pretrained_weights(network, fname, verbose=False):
    ref = _OWNERS.get(unwrap_network(network))
    owner = ref() if ref is not None else None
    if owner is not None:
        return owner.load_pretrained(fname)
    return _dispatching_load_pretrained_weights.stock(network, fname, verbose=verbose)


_dispatching_load_pretrained_weights.nnssl_dispatch = True


def install_pretrained_dispatch() -> None:
    """Route stock `-pretrained_weights` to the owning trainer.

    nnU-Net's `maybe_load_checkpoint` calls the module-level `load_pretrained_weights` of
    `nnunetv2.run.run_training`. We replace that name (once, idempotent) by a dispatcher: for a network
    registered by one of our trainers it calls `trainer.load_pretrained(fname)`; for any other network it
    calls nnU-Net's own function unchanged.
    """
    import nnunetv2.run.run_training as rt

    current = rt.load_pretrained_weights
    if getattr(current, "nnssl_dispatch", False):
        return
    _dispatching_load_pretrained_weights.stock = current
    rt.load_pretrained_weights = _dispatching_load_pretrained_weights


def register_pretrained_owner(network: nn.Module, trainer) -> None:
    install_pretrained_dispatch()
    _OWNERS[unwrap_network(network)] = weakref.ref(trainer)


# ----------------------------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------------------------
def warmup_epochs_for(num_epochs: int, reference_warmup: int = 50, reference_epochs: int = 1000) -> int:
    """Upstream's 50 warm-up epochs of 1000, scaled to the run length (at least 1)."""
    return max(1, int(round(reference_warmup / reference_epochs * num_epochs)))


class WarmupPolyLR(torch.optim.lr_scheduler._LRScheduler):
    """Linear warm-up to each group's `initial_lr` over `warmup` epochs, then poly(0.9) to 0.

    Called like nnU-Net's PolyLRScheduler: `step(current_epoch)` at every epoch start.
    """

    def __init__(self, optimizer, max_steps: int, warmup: int, exponent: float = 0.9):
        self.max_steps = max(1, int(max_steps))
        self.warmup = max(0, int(warmup))
        self.exponent = exponent
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.ctr = 0
        super().__init__(optimizer, -1)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        rest = max(1, self.max_steps - self.warmup)
        return max(0.0, 1 - (step - self.warmup) / rest) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        f = self.factor(int(current_step))
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
