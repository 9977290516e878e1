"""The reference AGW in PyTorch, written from ReID-Survey's definitions, for the parity tests.

Nothing here calls into ``reid_jax``: it is the yardstick the JAX code is measured against.

- the model: ``ResNetNL`` (torchvision v1.5 bottlenecks, last stride 1, non-local blocks after
  the *last* blocks of a stage, inter channels 1 or C/2, no ReLU after the stem unless asked),
  ``GeneralizedMeanPoolingP``, BNNeck (``BatchNorm1d`` with ``bias.requires_grad_(False)``) and
  the bias-free classifier (``modeling/baseline.py``, ``modeling/backbones/resnet_nl.py``,
  ``modeling/layer/non_local.py``, ``modeling/layer/gem_pool.py``);
- the losses: ``CrossEntropyLabelSmooth``, ``WeightedRegularizedTriplet`` (with
  ``euclidean_dist`` and ``softmax_weights``) and ``CenterLoss`` (``modeling/layer/*.py``);
- the optimizers of ``Baseline.get_optimizer``: ``torch.optim.Adam`` with one param group per
  trainable parameter and ``weight_decay`` on each, and ``SGD(center_criterion.parameters(),
  lr=CENTER_LR)``; ``WarmupMultiStepLR`` (``solver/lr_scheduler.py``);
- the update of ``engine/trainer.py``'s ``create_supervised_trainer``: both optimizers
  zeroed, one forward and backward of ``CE + triplet + w * center``, the model's Adam step,
  then the centers' gradients multiplied by ``1 / w`` and their SGD step. The scheduler is
  stepped at ``Events.EPOCH_STARTED``.
"""

from __future__ import annotations

import warnings
from bisect import bisect_right

import torch
from torch import nn

# ----------------------------------------------------------------------------- model


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class NonLocal(nn.Module):
    def __init__(self, channels: int, inter_channels: int):
        super().__init__()
        self.inter_channels = inter_channels
        self.g = nn.Conv2d(channels, inter_channels, 1)
        self.W = nn.Sequential(nn.Conv2d(inter_channels, channels, 1), nn.BatchNorm2d(channels))
        nn.init.constant_(self.W[1].weight, 0.0)
        nn.init.constant_(self.W[1].bias, 0.0)
        self.theta = nn.Conv2d(channels, inter_channels, 1)
        self.phi = nn.Conv2d(channels, inter_channels, 1)

    def forward(self, x):
        b, ci = x.size(0), self.inter_channels
        g_x = self.g(x).view(b, ci, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(b, ci, -1).permute(0, 2, 1)
        phi_x = self.phi(x).view(b, ci, -1)
        f = torch.matmul(theta_x, phi_x)
        y = torch.matmul(f / f.size(-1), g_x).permute(0, 2, 1).contiguous()
        return self.W(y.view(b, ci, *x.size()[2:])) + x


class ResNetNL(nn.Module):
    def __init__(self, width, blocks, non_local, reference_inter=True, stem_relu=False):
        super().__init__()
        self.stem_relu = stem_relu
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        strides = (1, 2, 2, 1)  # last stride 1
        for i in range(4):
            setattr(self, f"layer{i + 1}", self._make_layer(width * 2**i, blocks[i], strides[i]))
            channels = width * 2**i * 4
            inter = 1 if reference_inter else channels // 2
            setattr(self, f"NL_{i + 1}",
                    nn.ModuleList([NonLocal(channels, inter) for _ in range(non_local[i])]))
            setattr(self, f"NL_{i + 1}_idx", [blocks[i] - non_local[i] + k
                                              for k in range(non_local[i])])

    def _make_layer(self, planes, n, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        if self.stem_relu:
            x = torch.relu(x)
        x = self.maxpool(x)
        for s in range(1, 5):
            idx, nls = getattr(self, f"NL_{s}_idx"), getattr(self, f"NL_{s}")
            for i, block in enumerate(getattr(self, f"layer{s}")):
                x = block(x)
                if i in idx:
                    x = nls[idx.index(i)](x)
        return x


class GeneralizedMeanPoolingP(nn.Module):
    def __init__(self, norm=3.0, eps=1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * norm)
        self.eps = eps

    def forward(self, x):
        x = x.clamp(min=self.eps).pow(self.p)
        return nn.functional.adaptive_avg_pool2d(x, 1).pow(1.0 / self.p)


class AGW(nn.Module):
    """``Baseline`` with ``resnet50_nl``; ``forward`` returns (feature_map, pre_bn, post_bn,
    logits) in both modes (the reference returns (logits, pre_bn) in train mode)."""

    def __init__(self, num_classes, width, blocks, non_local, **kwargs):
        super().__init__()
        self.base = ResNetNL(width, blocks, non_local, **kwargs)
        dim = width * 32
        self.global_pool = GeneralizedMeanPoolingP()
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)

    def forward(self, x):
        feature_map = self.base(x)
        pre_bn = self.global_pool(feature_map).flatten(1)
        post_bn = self.bottleneck(pre_bn)
        return feature_map, pre_bn, post_bn, self.classifier(post_bn)


def randomize(module: nn.Module, seed: int, image_hw: tuple[int, int]) -> nn.Module:
    """Random float32 weights everywhere, BN statistics calibrated on random images.

    Every weight is random (BN scales and biases, the non-local W-BN away from its zero init,
    GeM's p = 2.7), so no gradient is zero by construction. Random statistics would let
    activations explode through the cubic non-local products in eval mode, so each BN's running
    mean / var are set to its batch statistics on a calibration batch (momentum 1 for one
    train-mode pass). Returns ``module`` in eval mode, BN momentum back at 0.1.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.momentum = 1.0
            elif isinstance(m, GeneralizedMeanPoolingP):
                m.p.fill_(2.7)
        module.train()
        module(torch.randn((8, 3, *image_hw), generator=gen))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.momentum = 0.1
                m.num_batches_tracked.fill_(123)
    return module.eval()


# ----------------------------------------------------------------------------- losses


def euclidean_dist(x, y):
    m, n = x.size(0), y.size(0)
    xx = torch.pow(x, 2).sum(1, keepdim=True).expand(m, n)
    yy = torch.pow(y, 2).sum(1, keepdim=True).expand(n, m).t()
    dist = xx + yy
    dist = dist - 2 * torch.matmul(x, y.t())
    return dist.clamp(min=1e-12).sqrt()


def softmax_weights(dist, mask):
    max_v = torch.max(dist * mask, dim=1, keepdim=True)[0]
    diff = dist - max_v
    z = torch.sum(torch.exp(diff) * mask, dim=1, keepdim=True) + 1e-6
    return torch.exp(diff) * mask / z


class WeightedRegularizedTriplet:
    def __init__(self):
        self.ranking_loss = nn.SoftMarginLoss()

    def __call__(self, global_feat, labels):
        dist_mat = euclidean_dist(global_feat, global_feat)
        n = dist_mat.size(0)
        is_pos = labels.expand(n, n).eq(labels.expand(n, n).t()).to(dist_mat.dtype)
        is_neg = labels.expand(n, n).ne(labels.expand(n, n).t()).to(dist_mat.dtype)
        dist_ap = dist_mat * is_pos
        dist_an = dist_mat * is_neg
        weights_ap = softmax_weights(dist_ap, is_pos)
        weights_an = softmax_weights(-dist_an, is_neg)
        furthest_positive = torch.sum(dist_ap * weights_ap, dim=1)
        closest_negative = torch.sum(dist_an * weights_an, dim=1)
        y = torch.ones_like(furthest_positive)
        return self.ranking_loss(closest_negative - furthest_positive, y)


class CrossEntropyLabelSmooth(nn.Module):
    def __init__(self, num_classes, epsilon=0.1):
        super().__init__()
        self.num_classes = num_classes
        self.epsilon = epsilon
        self.logsoftmax = nn.LogSoftmax(dim=1)

    def forward(self, inputs, targets):
        log_probs = self.logsoftmax(inputs)
        targets = torch.zeros_like(log_probs).scatter_(1, targets.unsqueeze(1), 1)
        targets = (1 - self.epsilon) * targets + self.epsilon / self.num_classes
        return (-targets * log_probs).mean(0).sum()


class CenterLoss(nn.Module):
    def __init__(self, num_classes, feat_dim):
        super().__init__()
        self.num_classes = num_classes
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, x, labels):
        batch_size = x.size(0)
        distmat = (torch.pow(x, 2).sum(dim=1, keepdim=True).expand(batch_size, self.num_classes)
                   + torch.pow(self.centers, 2).sum(dim=1, keepdim=True)
                   .expand(self.num_classes, batch_size).t())
        distmat = distmat.addmm(x, self.centers.t(), beta=1, alpha=-2)
        classes = torch.arange(self.num_classes).long()
        labels = labels.unsqueeze(1).expand(batch_size, self.num_classes)
        mask = labels.eq(classes.expand(batch_size, self.num_classes))
        dist = distmat * mask.to(distmat.dtype)
        return dist.clamp(min=1e-12, max=1e12).sum() / batch_size


# ----------------------------------------------------------------------------- optimizers


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    def __init__(self, optimizer, milestones, gamma=0.1, warmup_factor=1.0 / 3,
                 warmup_iters=500, last_epoch=-1):
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_factor = warmup_factor
        self.warmup_iters = warmup_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        warmup_factor = 1
        if self.last_epoch < self.warmup_iters:
            alpha = self.last_epoch / self.warmup_iters
            warmup_factor = self.warmup_factor * (1 - alpha) + alpha
        return [base_lr * warmup_factor * self.gamma ** bisect_right(self.milestones,
                                                                     self.last_epoch)
                for base_lr in self.base_lrs]


class Trainer:
    """The reference's optimisers, scheduler and update for ``model`` (train mode).

    Args:
      model: an :class:`AGW`.
      num_classes: identities (rows of the centers).
      base_lr, weight_decay: ``SOLVER.BASE_LR``, ``SOLVER.WEIGHT_DECAY``.
      center_lr, center_loss_weight: ``SOLVER.CENTER_LR``, ``SOLVER.CENTER_LOSS_WEIGHT``.
      warmup_factor, warmup_iters, milestones, gamma: ``WarmupMultiStepLR``'s (in epochs).
      centers: initial ``[C, D]`` centers (the reference draws ``torch.randn``).
    """

    def __init__(self, model: AGW, num_classes: int, *, base_lr: float, weight_decay: float,
                 center_lr: float, center_loss_weight: float, warmup_factor: float,
                 warmup_iters: int, milestones, gamma: float, centers: torch.Tensor,
                 label_smoothing: float = 0.1):
        self.model = model
        self.xent = CrossEntropyLabelSmooth(num_classes, label_smoothing)
        self.triplet = WeightedRegularizedTriplet()
        self.center = CenterLoss(num_classes, centers.shape[1]).to(centers.dtype)
        with torch.no_grad():
            self.center.centers.copy_(centers)
        self.center_loss_weight = center_loss_weight
        params = [{"params": [value], "lr": base_lr, "weight_decay": weight_decay}
                  for _, value in model.named_parameters() if value.requires_grad]
        self.optimizer = torch.optim.Adam(params)
        self.optimizer_center = torch.optim.SGD(self.center.parameters(), lr=center_lr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "step() before optimizer.step()": intended
            self.scheduler = WarmupMultiStepLR(self.optimizer, milestones, gamma, warmup_factor,
                                               warmup_iters)

    def start_epoch(self) -> None:
        """``Events.EPOCH_STARTED``: one scheduler step."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scheduler.step()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One update; returns the loss terms (``center`` unweighted) as Python floats."""
        self.model.train()
        self.optimizer.zero_grad()
        self.optimizer_center.zero_grad()
        _, feat, _, score = self.model(images)
        ce = self.xent(score, labels)
        triplet = self.triplet(feat, labels)
        center = self.center(feat, labels)
        loss = ce + triplet + self.center_loss_weight * center
        loss.backward()
        self.optimizer.step()
        for param in self.center.parameters():
            param.grad.data *= 1.0 / self.center_loss_weight
        self.optimizer_center.step()
        return {"loss": loss.item(), "ce": ce.item(), "triplet": triplet.item(),
                "center": center.item()}

