"""ImageNet CNN backbones as Flax modules (NHWC), with torchvision-exact weights.

Public API:
  names()                                   -> ('resnet18', ..., 'efficientnet_lite0')
  build(name, dtype=jnp.float32)            -> nn.Module; __call__(x, taps, train) -> {tap: array}
  preprocess(name, images01)                -> normalised input
  spec(name)                                -> BackboneSpec (mean, std, strides, channels)
  load_variables(name, weights='', *, allow_random_init=False, key=None) -> variables
  extractor(name, variables, taps, dtype)   -> pure fn(variables, images01) -> {tap: array}

Taps: 'stem' (stride 2), 'layer1'..'layer4' (strides 4, 8, 16, 32) and 'logits'; see each
family module's docstring for exactly which tensor each tap is.

Reusing an encoder with its first convolution separated (e.g. the refinement network, which
fuses the image and the anomaly map after the first conv): every backbone has the methods
  first_conv(x)                       x: [B, H, W, 3] -> [B, H/2, W/2, C0] (conv only, no BN)
  from_first_conv(h, taps, train)     the rest of the network from that conv output
and `__call__ = from_first_conv(first_conv(x))`. Inside a parent module hold the encoder as a
submodule (`self.encoder = backbones.build('densenet161')`) and call
`self.encoder.first_conv(img)`, fuse, then `self.encoder.from_first_conv(h, taps=('stem',
'layer1', 'layer2', 'layer3', 'layer4'))` for the decoder's skips; the encoder's variables
then live under the submodule's name and pretrained ones can be placed there
(`params['encoder'] = load_variables('densenet161', ...)['params']`). From outside:
`model.apply(variables, x, method='first_conv')`. The blocks themselves (ResNetStage,
DenseBlock, Transition, MBConv, ...) are exported too.
"""

from pni_jax.backbones.densenet import DenseBlock, DenseLayer, DenseNet, Transition
from pni_jax.backbones.efficientnet_lite import EfficientNetLite0, MBConv
from pni_jax.backbones.layers import DEFAULT_TAPS, TAP_ORDER
from pni_jax.backbones.registry import (
    BackboneSpec,
    abstract_variables,
    build,
    check_variables,
    convert_command,
    convert_state_dict,
    embedded_lite0_path,
    extractor,
    load_variables,
    names,
    preprocess,
    spec,
)
from pni_jax.backbones.resnet import BasicBlock, Bottleneck, ResNet, ResNetStage

__all__ = [
    'BackboneSpec', 'BasicBlock', 'Bottleneck', 'DEFAULT_TAPS', 'DenseBlock', 'DenseLayer',
    'DenseNet', 'EfficientNetLite0', 'MBConv', 'ResNet', 'ResNetStage', 'TAP_ORDER',
    'Transition', 'abstract_variables', 'build', 'check_variables', 'convert_command',
    'convert_state_dict', 'embedded_lite0_path', 'extractor', 'load_variables', 'names',
    'preprocess', 'spec',
]
