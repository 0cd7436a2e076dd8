"""MASS in-context segmentation model (Iris-style) on a ResidualEncoderUNet backbone.

Module layout (the model is a SUPERSET of the downstream nnU-Net network):
  encoder.*        the ResidualEncoderUNet encoder (same keys as the stock network)
  decoder.*        the ResidualEncoderUNet decoder (same keys; `decoder.seg_layers` exist but are unused)
  task_encoder.*   method-only: per-stage task encoding (foreground token + context stream + query tokens)
  query_decoder.*  method-only: per-stage bidirectional cross-attention inserted into the decoder
  head.*           method-only: dynamic per-class head (token 0 of each stage -> MLP -> weights)

Task-encoding stages. MASS/Iris encode the task at strides 16, 8, 4, i.e. the three deepest stages of the
default 5-stage backbone (cumulative strides 1,2,4,8,16). In general we use the deepest
`n_task_stages` (default 3) stages but never stage 0 (full resolution):
  5 stages (default, strides 1..16): stages 2,3,4 -> strides 4, 8, 16   (= paper)
  4 stages (tiny, strides 1..8):     stages 1,2,3 -> strides 2, 4, 8
  3 stages (strides 1..4):           stages 1,2   -> strides 2, 4
The query decoder attends at the same resolutions: on the bottleneck and after each decoder stage whose
output resolution is a task stage. Attention heads = max(1, C // 32) (reduced until they divide C).

Where the paper text is vague (the official `models/iris.py` was not available to us), these choices were made:
- foreground token: mean of (trilinearly upsampled features) over the reference mask, computed exactly but
  without materialising full-res features (adjoint of the upsampling applied to the mask);
- context stream: 1x1x1 conv C -> c*s^3 when C is not divisible by s^3 (e.g. 512 ch at stride 16),
  pixel shuffle to full res (c channels), concat mask, 3x3x3 conv + GELU, + learned positional
  embedding (c x patch size; interpolated if the reference size differs), pixel unshuffle, 1x1x1 conv
  back to C, residual add to the features, LayerNorm -> context tokens;
- tokens = [foreground token, 10 learned query tokens]; 2 blocks of self-attn -> cross-attn(context) ->
  self-attn -> MLP (pre-norm, residual);
- query decoder: tokens of all K classes are concatenated (B, K*11, C); per block tokens->image
  cross-attn, image->tokens cross-attn, token self-attn, token MLP; decoder features are shared by all
  classes so the conv decoder runs once, not K times;
- head: token 0 of each class at each stage (after the query decoder), concatenated -> MLP -> C0
  (= 32 by default) weights; logit = <weights, final decoder feature> + learned scalar bias.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.pretrain.mass.arch import build_backbone, cumulative_strides

EMBEDDING_FORMAT = "nnssl_mass_task_embedding"
EMBEDDING_VERSION = "1"


# ----------------------------------------------------------------------------------------------------------
# small building blocks
# ----------------------------------------------------------------------------------------------------------
def num_heads_for(c: int, head_dim: int = 32) -> int:
    h = max(1, c // head_dim)
    while c % h:
        h -= 1
    return h


def pixel_shuffle_3d(x: torch.Tensor, r: Sequence[int]) -> torch.Tensor:
    """[B, c*r0*r1*r2, D, H, W] -> [B, c, D*r0, H*r1, W*r2]."""
    b, C, d, h, w = x.shape
    r0, r1, r2 = r
    c = C // (r0 * r1 * r2)
    x = x.reshape(b, c, r0, r1, r2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, d * r0, h * r1, w * r2)


def pixel_unshuffle_3d(x: torch.Tensor, r: Sequence[int]) -> torch.Tensor:
    """Inverse of pixel_shuffle_3d."""
    b, c, X, Y, Z = x.shape
    r0, r1, r2 = r
    x = x.reshape(b, c, X // r0, r0, Y // r1, r1, Z // r2, r2).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * r0 * r1 * r2, X // r0, Y // r1, Z // r2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.h = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, nq, c = q.shape
        nk = kv.shape[1]
        h = self.h
        qh = self.q(q).reshape(b, nq, h, c // h).transpose(1, 2)
        kh = self.k(kv).reshape(b, nk, h, c // h).transpose(1, 2)
        vh = self.v(kv).reshape(b, nk, h, c // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh, vh)
        return self.o(out.transpose(1, 2).reshape(b, nq, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TaskBlock(nn.Module):
    """self-attn -> cross-attn(context) -> self-attn -> MLP, pre-norm residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.n1, self.sa1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.n2, self.ca = nn.LayerNorm(dim), Attention(dim, heads)
        self.n3, self.sa2 = nn.LayerNorm(dim), Attention(dim, heads)
        self.n4, self.mlp = nn.LayerNorm(dim), MLP(dim, int(dim * mlp_ratio))

    def forward(self, t, ctx):
        x = self.n1(t)
        t = t + self.sa1(x, x)
        t = t + self.ca(self.n2(t), ctx)
        x = self.n3(t)
        t = t + self.sa2(x, x)
        return t + self.mlp(self.n4(t))


class TwoWayBlock(nn.Module):
    """tokens->image cross-attn, image->tokens cross-attn, token self-attn, token MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.nt1, self.ni1, self.t2i = nn.LayerNorm(dim), nn.LayerNorm(dim), Attention(dim, heads)
        self.nt2, self.ni2, self.i2t = nn.LayerNorm(dim), nn.LayerNorm(dim), Attention(dim, heads)
        self.nt3, self.sa = nn.LayerNorm(dim), Attention(dim, heads)
        self.nt4, self.mlp = nn.LayerNorm(dim), MLP(dim, int(dim * mlp_ratio))

    def forward(self, t, img):
        t = t + self.t2i(self.nt1(t), self.ni1(img))
        img = img + self.i2t(self.ni2(img), self.nt2(t))
        x = self.nt3(t)
        t = t + self.sa(x, x)
        t = t + self.mlp(self.nt4(t))
        return t, img


# ----------------------------------------------------------------------------------------------------------
# task embedding container
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TaskEmbedding:
    """Per task stage tokens, each [B, K, T, C_s] (T = 1 foreground + num_query_tokens)."""

    tokens: list
    strides: list = field(default_factory=list)  # cumulative stride (per axis) of each task stage
    num_references: int = 1

    @property
    def num_classes(self) -> int:
        return int(self.tokens[0].shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.tokens[0].shape[0])

    def to(self, *args, **kwargs) -> "TaskEmbedding":
        return TaskEmbedding([t.to(*args, **kwargs) for t in self.tokens], list(self.strides), self.num_references)

    def detach(self) -> "TaskEmbedding":
        return TaskEmbedding([t.detach() for t in self.tokens], list(self.strides), self.num_references)

    def mean_over_batch(self) -> "TaskEmbedding":
        """Average B references (batch entries) into one embedding (B=1)."""
        return TaskEmbedding([t.mean(0, keepdim=True) for t in self.tokens], list(self.strides),
                             self.num_references * self.batch_size)

    def save(self, path: str) -> None:
        """Write as safetensors (no pickle), atomically."""
        from safetensors.torch import save_file

        from nnssl_plugins.utils.io import atomic_path

        tensors = {f"stage_{i}": t.detach().cpu().contiguous() for i, t in enumerate(self.tokens)}
        meta = {"format": EMBEDDING_FORMAT, "version": EMBEDDING_VERSION,
                "strides": json.dumps([list(s) for s in self.strides]),
                "num_references": str(int(self.num_references)), "num_stages": str(len(self.tokens))}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str, device="cpu") -> "TaskEmbedding":
        import os

        from safetensors import safe_open

        if not os.path.isfile(path):
            raise UserInputError(f"{path}: task embedding file not found. Create it with the MASS encode-task step.")
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != EMBEDDING_FORMAT:
                    raise ValueError("not a MASS task embedding")
                n = int(meta["num_stages"])
                tokens = [f.get_tensor(f"stage_{i}") for i in range(n)]
            strides = [tuple(s) for s in json.loads(meta["strides"])]
            return cls(tokens, strides, int(meta.get("num_references", 1)))
        except Exception as e:  # noqa: BLE001 - any read problem is a bad user file
            raise UserInputError(f"{path}: cannot be read as a MASS task embedding ({str(e)[:200]}). "
                                 f"Re-create it with TaskEmbedding.save / the encode-task command.") from None


def average_embeddings(embeddings: Sequence[TaskEmbedding]) -> TaskEmbedding:
    """Average task embeddings of several references (weighted by how many references each holds).

    Each embedding's batch entries are averaged first, so the result has B=1.
    """
    embeddings = list(embeddings)
    if not embeddings:
        raise UserInputError("average_embeddings: got no task embeddings. Pass at least one reference.")
    embeddings = [e.mean_over_batch() if e.batch_size > 1 else e for e in embeddings]
    ref = embeddings[0]
    for e in embeddings[1:]:
        if len(e.tokens) != len(ref.tokens) or any(a.shape != b.shape for a, b in zip(e.tokens, ref.tokens)):
            raise UserInputError(
                "average_embeddings: task embeddings differ in shape "
                f"({[tuple(t.shape) for t in ref.tokens]} vs {[tuple(t.shape) for t in e.tokens]}). All references "
                "must use the same model and the same number of mask channels (classes) in the same order.")
    w = torch.tensor([float(e.num_references) for e in embeddings])
    w = w / w.sum()
    tokens = []
    for i in range(len(ref.tokens)):
        stacked = torch.stack([e.tokens[i].float() for e in embeddings], 0)
        tokens.append((stacked * w.to(stacked.device).view(-1, *[1] * (stacked.ndim - 1))).sum(0)
                      .to(ref.tokens[i].dtype))
    return TaskEmbedding(tokens, list(ref.strides), int(sum(e.num_references for e in embeddings)))


# ----------------------------------------------------------------------------------------------------------
# task encoder
# ----------------------------------------------------------------------------------------------------------
def _linear_upsample_adjoint(x: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """Transpose of 1D linear upsampling `size` -> x.shape[axis] (align_corners=False) applied along `axis`.

    The 1D weights come from F.interpolate of the identity (the same source-index rule as trilinear, which is
    separable), so this is exactly U_axis^T. Each output position draws on at most two inputs: two index_adds.
    Plain tensor ops only (works under torch.inference_mode)."""
    n = x.shape[axis]
    if n == size:
        return x
    eye = torch.eye(size, dtype=torch.float32, device=x.device)[None]
    u = F.interpolate(eye, size=n, mode="linear", align_corners=False)[0].to(x.dtype)  # [size, n]
    w, idx = u.topk(min(2, size), dim=0)  # the (<= 2) contributing inputs of every output position
    shape = list(x.shape)
    shape[axis] = size
    out = x.new_zeros(shape)
    view = [1] * x.ndim
    view[axis] = n
    for r in range(w.shape[0]):
        out.index_add_(axis, idx[r], x * w[r].view(view))
    return out


def masked_mean_of_upsampled(feat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """mean_{v in mask} upsample(feat)(v) for every mask channel, without materialising upsample(feat).

    feat [B, C, d, h, w], masks [B, K, X, Y, Z] -> [B, K, C]. Trilinear upsampling (align_corners=False) is
    linear and separable, U = U_x (x) U_y (x) U_z, so sum_v m(v) (U f)(v) = sum_u f(u) (U^T m)(u) with
    U^T m computed axis by axis (`_linear_upsample_adjoint`; no autograd, so inference_mode is fine).
    """
    m = masks.float()
    w = m
    for ax, size in enumerate(feat.shape[2:]):
        w = _linear_upsample_adjoint(w, 2 + ax, int(size))
    w = w.to(feat.dtype).flatten(2)  # [B, K, n]
    summed = torch.einsum("bkn,bcn->bkc", w, feat.flatten(2))
    return summed / m.flatten(2).sum(-1).clamp_min(1.0).unsqueeze(-1).to(feat.dtype)


class ContextStream(nn.Module):
    """Pixel shuffle to full res, concat mask, conv, + learned pos-emb, unshuffle, residual."""

    def __init__(self, channels: int, stride: Sequence[int], patch_size: Sequence[int]):
        super().__init__()
        self.stride = tuple(int(s) for s in stride)
        p = self.stride[0] * self.stride[1] * self.stride[2]
        self.c = max(1, math.ceil(channels / p))
        cp = self.c * p
        self.proj_in = nn.Conv3d(channels, cp, 1) if cp != channels else None
        self.proj_out = nn.Conv3d(cp, channels, 1) if cp != channels else None
        self.fuse = nn.Conv3d(self.c + 1, self.c, 3, padding=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.c, *[int(i) for i in patch_size]))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.norm = nn.LayerNorm(channels)

    def forward(self, feat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """feat [B, C, d, h, w], masks [B, K, X, Y, Z] -> context tokens [B*K, n, C]."""
        B, C = feat.shape[:2]
        K = masks.shape[1]
        x = self.proj_in(feat) if self.proj_in is not None else feat
        full = pixel_shuffle_3d(x, self.stride)  # [B, c, X, Y, Z]
        # conv(cat(full, mask)) = conv_feat(full) + conv_mask(mask): the feature part is shared by the K
        # masks, so it is computed once per image (exactly the same result, K times fewer feature FLOPs).
        w = self.fuse.weight
        yf = F.conv3d(full, w[:, :-1], self.fuse.bias, padding=1)  # [B, c, X, Y, Z]
        m = masks.reshape(B * K, 1, *masks.shape[2:]).to(full.dtype)
        ym = F.conv3d(m, w[:, -1:].to(full.dtype), None, padding=1).reshape(B, K, self.c, *masks.shape[2:])
        y = F.gelu(yf.unsqueeze(1) + ym).reshape(B * K, self.c, *masks.shape[2:])
        pos = self.pos_embed
        if tuple(pos.shape[2:]) != tuple(y.shape[2:]):
            pos = F.interpolate(pos, size=y.shape[2:], mode="trilinear", align_corners=False)
        y = pixel_unshuffle_3d(y + pos.to(y.dtype), self.stride)
        if self.proj_out is not None:
            y = self.proj_out(y)
        ctx = feat.unsqueeze(1).expand(B, K, *feat.shape[1:]).reshape(B * K, *feat.shape[1:]) + y
        return self.norm(ctx.flatten(2).transpose(1, 2))


class TaskEncoderStage(nn.Module):
    def __init__(self, channels, stride, patch_size, num_query_tokens=10, num_blocks=2):
        super().__init__()
        heads = num_heads_for(channels)
        self.context = ContextStream(channels, stride, patch_size)
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, channels) * 0.02)
        self.fg_norm = nn.LayerNorm(channels)
        self.blocks = nn.ModuleList([TaskBlock(channels, heads) for _ in range(num_blocks)])
        self.out_norm = nn.LayerNorm(channels)

    def forward(self, feat, masks):
        B, C = feat.shape[:2]
        K = masks.shape[1]
        fg = self.fg_norm(masked_mean_of_upsampled(feat, masks)).reshape(B * K, 1, C)
        ctx = self.context(feat, masks)
        t = torch.cat((fg, self.query_tokens.expand(B * K, -1, -1).to(fg.dtype)), 1)
        for blk in self.blocks:
            t = blk(t, ctx)
        return self.out_norm(t).reshape(B, K, -1, C)


# ----------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------
class MASSModel(nn.Module):
    def __init__(self, backbone, arch_kwargs: dict, input_channels: int, patch_size: Sequence[int],
                 num_query_tokens: int = 10, n_task_stages: int = 3, num_task_blocks: int = 2,
                 num_decoder_blocks: int = 2):
        super().__init__()
        self.encoder = backbone.encoder
        self.decoder = backbone.decoder
        self.input_channels = int(input_channels)
        self.patch_size = tuple(int(i) for i in patch_size)
        feats = list(arch_kwargs["features_per_stage"])
        n = len(feats)
        self.n_stages = n
        self.stage_strides = cumulative_strides(arch_kwargs)
        self.task_stages = list(range(max(1, n - n_task_stages), n))
        if not self.task_stages:
            raise UserInputError("arch_kwargs: MASS needs at least 2 stages (one downsampling).")
        self.task_strides = [self.stage_strides[i] for i in self.task_stages]
        self.total_stride = self.stage_strides[-1]
        for ax, (p, s) in enumerate(zip(self.patch_size, self.total_stride)):
            if p % s:
                raise UserInputError(f"patch_size {self.patch_size}: axis {ax} ({p}) is not divisible by the "
                                     f"network's total stride {s}. Choose a multiple of {s}.")
        self.num_query_tokens = num_query_tokens
        self.task_encoder = nn.ModuleList([
            TaskEncoderStage(feats[i], self.stage_strides[i], self.patch_size, num_query_tokens, num_task_blocks)
            for i in self.task_stages])
        self.query_decoder = nn.ModuleList([
            nn.ModuleList([TwoWayBlock(feats[i], num_heads_for(feats[i])) for _ in range(num_decoder_blocks)])
            for i in self.task_stages])
        head_in = sum(feats[i] for i in self.task_stages)
        self.head = MLP(head_in, max(head_in // 2, feats[0]), feats[0])
        self.head_bias = nn.Parameter(torch.zeros(1))
        self.feature_channels = feats[0]
        self.feature_stride = self.stage_strides[0]

    # -- checks ----------------------------------------------------------------------------------------
    def _check_image(self, x: torch.Tensor, name: str) -> None:
        if x.ndim != 5:
            raise UserInputError(f"{name}: expected a 5D tensor [B, C, X, Y, Z], got shape {tuple(x.shape)}.")
        if x.shape[1] != self.input_channels:
            raise UserInputError(
                f"{name}: has {x.shape[1]} channel(s) but the MASS model expects {self.input_channels} "
                f"(reference and query must have the same channels/modalities as in pretraining).")
        for ax, (p, s) in enumerate(zip(x.shape[2:], self.total_stride)):
            if p % s:
                raise UserInputError(f"{name}: spatial size {tuple(x.shape[2:])} axis {ax} is not divisible by the "
                                     f"total stride {s}. Pad or crop to a multiple of {tuple(self.total_stride)}.")

    # -- parts -----------------------------------------------------------------------------------------
    def encode_task(self, ref_image: torch.Tensor, ref_masks: torch.Tensor,
                    ref_features: Optional[list] = None) -> TaskEmbedding:
        """ref_image [B, C, X, Y, Z], ref_masks [B, K, X, Y, Z] (binary) -> TaskEmbedding (B, K)."""
        self._check_image(ref_image, "reference image")
        if ref_masks.ndim != 5 or ref_masks.shape[0] != ref_image.shape[0] or \
                tuple(ref_masks.shape[2:]) != tuple(ref_image.shape[2:]):
            raise UserInputError(
                f"reference masks: shape {tuple(ref_masks.shape)} does not match the reference image "
                f"{tuple(ref_image.shape)}; expected [B, K, X, Y, Z] with the image's B and spatial size.")
        skips = ref_features if ref_features is not None else self.encoder(ref_image)
        tokens = [stage(skips[i], ref_masks) for stage, i in zip(self.task_encoder, self.task_stages)]
        return TaskEmbedding(tokens, [tuple(s) for s in self.task_strides], 1)

    def _check_embedding(self, emb: TaskEmbedding, batch: int) -> None:
        if len(emb.tokens) != len(self.task_stages) or any(
                t.shape[-1] != self.encoder.output_channels[i] for t, i in zip(emb.tokens, self.task_stages)):
            raise UserInputError(
                f"task embedding: shapes {[tuple(t.shape) for t in emb.tokens]} do not fit this model "
                f"(stage channels {[self.encoder.output_channels[i] for i in self.task_stages]}). "
                f"Encode the references with the same model.")
        if emb.batch_size not in (1, batch):
            raise UserInputError(f"task embedding: batch size {emb.batch_size} vs query batch {batch}; "
                                 f"use one embedding (B=1, e.g. average_embeddings) or one per query.")

    def decode(self, skips: list, emb: Optional[TaskEmbedding]) -> tuple[torch.Tensor, list]:
        """Run the U-Net decoder; at task stages apply the query decoder. Returns (final feature, tokens)."""
        B = skips[0].shape[0]
        tok_out = []
        stage_to_task = {s: j for j, s in enumerate(self.task_stages)}

        def attend(x, enc_stage):
            j = stage_to_task.get(enc_stage)
            if emb is None or j is None:
                return x
            t = emb.tokens[j].to(x.dtype)
            if t.shape[0] != B:
                t = t.expand(B, *t.shape[1:])
            K, T, C = t.shape[1:]
            t = t.reshape(B, K * T, C)
            shp = x.shape
            img = x.flatten(2).transpose(1, 2)
            for blk in self.query_decoder[j]:
                t, img = blk(t, img)
            tok_out.append(t.reshape(B, K, T, C)[:, :, 0])
            return img.transpose(1, 2).reshape(shp)

        dec = self.decoder
        lres = attend(skips[-1], self.n_stages - 1)
        for s in range(len(dec.stages)):
            x = dec.transpconvs[s](lres)
            x = torch.cat((x, skips[-(s + 2)]), 1)
            x = dec.stages[s](x)
            lres = attend(x, self.n_stages - 2 - s)
        return lres, tok_out

    def segment(self, query_image: torch.Tensor, task_embedding: TaskEmbedding) -> torch.Tensor:
        """query_image [B, C, X, Y, Z] -> logits [B, K, X, Y, Z]."""
        self._check_image(query_image, "query image")
        self._check_embedding(task_embedding, query_image.shape[0])
        return self._segment_from_skips(self.encoder(query_image), task_embedding)

    def _segment_from_skips(self, skips, emb):
        feat, toks = self.decode(skips, emb)
        # toks are in decoder order (deepest first); any fixed order works for the head
        w = self.head(torch.cat(toks, -1))  # [B, K, C0]
        return torch.einsum("bkc,bcxyz->bkxyz", w, feat) + self.head_bias.to(feat.dtype)

    def forward(self, ref_image: torch.Tensor, ref_masks: torch.Tensor, query_image: torch.Tensor) -> torch.Tensor:
        """Training forward: logits [B, K, X, Y, Z] for the query, conditioned on the reference."""
        self._check_image(ref_image, "reference image")
        self._check_image(query_image, "query image")
        if ref_image.shape[0] != query_image.shape[0]:
            raise UserInputError(f"reference batch {ref_image.shape[0]} != query batch {query_image.shape[0]}.")
        if ref_image.shape == query_image.shape:
            both = self.encoder(torch.cat((ref_image, query_image), 0))  # InstanceNorm: per-sample, so exact
            B = ref_image.shape[0]
            ref_skips, q_skips = [s[:B] for s in both], [s[B:] for s in both]
        else:
            ref_skips, q_skips = self.encoder(ref_image), self.encoder(query_image)
        emb = self.encode_task(ref_image, ref_masks, ref_features=ref_skips)
        return self._segment_from_skips(q_skips, emb)

    def features(self, image: torch.Tensor, task_embedding: Optional[TaskEmbedding] = None) -> torch.Tensor:
        """Final decoder features [B, C0, X, Y, Z] (plain U-Net path when no task embedding is given)."""
        self._check_image(image, "image")
        return self.decode(self.encoder(image), task_embedding)[0]

    # -- bookkeeping -----------------------------------------------------------------------------------
    def parameter_counts(self) -> dict:
        enc = {id(p) for p in self.encoder.parameters()}
        dec_unet = sum(p.numel() for p in self.decoder.parameters() if id(p) not in enc)
        dec_seg = sum(p.numel() for p in self.decoder.seg_layers.parameters())
        qd = sum(p.numel() for p in self.query_decoder.parameters())
        head = sum(p.numel() for p in self.head.parameters()) + self.head_bias.numel()
        te = sum(p.numel() for p in self.task_encoder.parameters())
        pos = sum(s.context.pos_embed.numel() for s in self.task_encoder)
        return {
            "encoder": sum(p.numel() for p in self.encoder.parameters()),
            "decoder_unet": dec_unet - dec_seg,
            "decoder_seg_layers_unused": dec_seg,
            "query_decoder": qd,
            "head": head,
            "decoder_total": dec_unet - dec_seg + qd + head,
            "task_encoder": te,
            "task_encoder_pos_embed": pos,
            "total": sum(p.numel() for p in self.parameters()),
        }


def build_mass_model(arch_kwargs: dict, input_channels: int, patch_size: Sequence[int] = (128, 128, 128),
                     num_query_tokens: int = 10, n_task_stages: int = 3, num_task_blocks: int = 2,
                     num_decoder_blocks: int = 2) -> MASSModel:
    """Build MASS on a ResidualEncoderUNet given plans-format `arch_kwargs` (strings or classes).

    `patch_size` is the crop size used in pretraining (sets the learned positional embeddings of the
    context stream; other sizes are handled by interpolation).
    """
    if input_channels < 1:
        raise UserInputError(f"input_channels: must be >= 1, got {input_channels}.")
    if len(patch_size) != 3:
        raise UserInputError(f"patch_size: MASS is 3D, expected 3 values, got {patch_size}.")
    backbone = build_backbone(arch_kwargs, input_channels, num_classes=1, deep_supervision=False)
    return MASSModel(backbone, arch_kwargs, input_channels, patch_size, num_query_tokens, n_task_stages,
                     num_task_blocks, num_decoder_blocks)
