"""LRP canonizers: rewrite a model (xaicli's LRP applies them to a deep copy it owns) into a form
whose every layer has an LRP rule.

    canonizers_for(model)     the Zennit canonizers for the architecture (merge BatchNorm into the
                              conv/linear before it, skip connections as an explicit Sum module)
    unsupported_layers(model) (name, type) of what no LRP rule covers after canonization

torchvision ResNet and VGG use Zennit's `ResNetCanonizer` / `VGGCanonizer`; timm EfficientNet
blocks (`BatchNormAct2d` = BatchNorm + activation in one module, inverted residual blocks with a
skip) use the two canonizers written here; anything else gets `SequentialMergeBatchNorm`.
"""

from __future__ import annotations

import torch
from torch import nn
from zennit.canonizers import AttributeCanonizer, Canonizer, SequentialMergeBatchNorm
from zennit.layer import Sum
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

try:  # timm is a dependency, but keep the module importable without its internals
    from timm.layers import BatchNormAct2d
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
except ImportError:  # pragma: no cover
    BatchNormAct2d = DepthwiseSeparableConv = InvertedResidual = None


class TimmBatchNormActCanonizer(Canonizer):
    """timm `BatchNormAct2d` right after a conv/linear: the BatchNorm merges into that layer (Zennit's
    `MergeBatchNorm.merge_batch_norm`, running statistics) and the module is replaced by its
    activation (its `drop` is the identity in eval mode). `remove()` restores both."""

    def __init__(self):
        self.parent = self.attr = self.original = None
        self.merge = None

    def apply(self, root_module: nn.Module) -> list:
        if BatchNormAct2d is None:
            return []
        instances = []
        prev = None
        skip_prefix = None
        for name, module in list(root_module.named_modules()):
            if skip_prefix is not None and name.startswith(skip_prefix):
                continue
            if isinstance(module, BatchNormAct2d):
                skip_prefix = name + "."
                if isinstance(prev, nn.Conv2d | nn.Linear) and isinstance(module.drop, nn.Identity | nn.Dropout):
                    inst = self.copy()
                    inst.register(root_module, name, prev, module)
                    instances.append(inst)
                prev = module
            elif not any(True for _ in module.children()):
                prev = module
        return instances

    def register(self, root_module: nn.Module, name: str, linear: nn.Module, bn: nn.Module) -> None:
        parent_name, _, attr = name.rpartition(".")
        self.parent = root_module.get_submodule(parent_name) if parent_name else root_module
        self.attr, self.original = attr, bn
        self.merge = SequentialMergeBatchNorm()
        self.merge.register([linear], bn)  # bn becomes the identity, linear carries its affine map
        setattr(self.parent, attr, bn.act)

    def remove(self) -> None:
        if self.parent is not None:
            setattr(self.parent, self.attr, self.original)
            self.merge.remove()
            self.parent = None

    def copy(self):
        return TimmBatchNormActCanonizer()


def _efficientnet_block_forward(self, x):
    """timm InvertedResidual / DepthwiseSeparableConv forward with the skip as a `Sum` module."""
    shortcut = x
    if getattr(self, "conv_s2d", None) is not None:
        x = self.bn_s2d(self.conv_s2d(x))
    if isinstance(self, InvertedResidual):
        x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        x = self.bn3(self.conv_pwl(self.se(self.aa(x))))
    else:
        x = self.bn2(self.conv_pw(self.se(self.aa(self.bn1(self.conv_dw(x))))))
    return self.canonizer_sum(torch.stack([shortcut, self.drop_path(x)], dim=-1))


class TimmSkipCanonizer(AttributeCanonizer):
    """timm EfficientNet blocks with a skip (`has_skip`): the residual sum goes through a Zennit
    `Sum` module, so an LRP rule (Norm: in proportion to the two inputs) splits its relevance."""

    def __init__(self):
        super().__init__(self._attribute_map)

    @staticmethod
    def _attribute_map(name, module):
        if InvertedResidual is not None and isinstance(module, InvertedResidual | DepthwiseSeparableConv):
            if getattr(module, "has_skip", False):
                return {"forward": _efficientnet_block_forward.__get__(module), "canonizer_sum": Sum()}
        return None

    def copy(self):
        return TimmSkipCanonizer()


def _is_torchvision(model: nn.Module, family: str) -> bool:
    return type(model).__module__.startswith(f"torchvision.models.{family}")


def _is_timm_efficientnet(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and type(model).__name__ == "EfficientNet"


def canonizers_for(model: nn.Module) -> list[Canonizer]:
    """The canonizers for `model`'s architecture (applied in order)."""
    if _is_torchvision(model, "resnet"):
        return [ResNetCanonizer()]
    if _is_torchvision(model, "vgg"):
        return [VGGCanonizer()]
    if _is_timm_efficientnet(model):
        return [TimmBatchNormActCanonizer(), TimmSkipCanonizer(), SequentialMergeBatchNorm()]
    return [SequentialMergeBatchNorm()]


#: leaves an LRP composite has a rule for (Conv/Linear: the composite's rule; activations: pass;
#: pooling: max = winner takes all, average = proportional; Sum: proportional) or that do nothing
SUPPORTED_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Linear,
    nn.ReLU,
    nn.ReLU6,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    Sum,
)
#: containers whose forward only chains their children (or was canonized to do so)
SUPPORTED_CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _container_ok(module: nn.Module) -> bool:
    if isinstance(module, SUPPORTED_CONTAINERS) or hasattr(module, "canonizer_sum"):
        return True
    cls = type(module)
    if cls.__module__.startswith("torchvision.models.resnet") and cls.__name__ in ("BasicBlock", "Bottleneck"):
        return False  # not canonized: its skip would be an untracked `+`
    if cls.__module__.startswith("timm.") and cls.__name__ in ("InvertedResidual", "DepthwiseSeparableConv"):
        return not getattr(module, "has_skip", False) and getattr(module, "conv_s2d", None) is None
    return cls.__name__ == "SelectAdaptivePool2d" and cls.__module__.startswith("timm.")


def _identity_bn(bn: nn.Module) -> bool:
    """A BatchNorm a canonizer has merged away (mean 0, var 1, weight 1, bias 0)."""
    return (
        getattr(bn, "running_mean", None) is not None
        and bool((bn.running_mean == 0).all() and (bn.running_var == 1).all())
        and (bn.weight is None or bool((bn.weight == 1).all()))
        and (bn.bias is None or bool((bn.bias == 0).all()))
    )


def unsupported_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, type) of the modules of a canonized model no LRP rule covers: a layer type without
    a rule (LayerNorm, attention, GELU, ...), a BatchNorm no canonizer could merge, or a block
    whose forward may add tensors outside a `Sum` module (an uncanonized skip connection). The
    model's own (root) forward is trusted to chain its children."""
    bad = []
    for name, m in model.named_modules():
        if not name:
            continue
        if any(True for _ in m.children()):
            if not _container_ok(m):
                bad.append((name, type(m).__name__))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not _identity_bn(m):
                bad.append((name, type(m).__name__ + " (not after a conv/linear it could merge into)"))
        elif not isinstance(m, SUPPORTED_LEAVES):
            bad.append((name, type(m).__name__))
    return bad


def canonized_copy(model: nn.Module, canonizers: list[Canonizer]) -> nn.Module:
    """A deep copy of `model` in eval mode, without parameter gradients, with `canonizers` applied
    for good (the copy is never reverted; `model` itself is not touched). A BatchNorm merged away
    gets eps 0, so it is the exact identity (Zennit's merge leaves a 1/sqrt(1 + eps) factor)."""
    import copy

    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    for canonizer in canonizers:
        canonizer.apply(net)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _identity_bn(m):
            m.eps = 0.0
    return net
