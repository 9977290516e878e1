r"""AGW on Market-1501: the reference recipe (ReID-Survey ``configs/AGW_baseline.yml``).

  python tools/train.py --config=configs/agw_market1501.py --workdir=/tmp/agw_market \
      --config.data.root=/data/Market-1501-v15.09.15 --config.init_from=/ckpt/resnet50_imagenet

Every field (docs/design.md, "AGW as the reference has it", for the recipe):

- ``data``: ``source`` ("folder" | "tfds", ``reid_jax.data.sources``; with "tfds" also
  ``tfds_data_dir`` and ``tfds_config``), ``root`` (the folder with ``bounding_box_train/``,
  ``query/``, ``bounding_box_test/``), ``height`` x ``width`` (256 x 128), ``p`` identities x
  ``k`` images per batch (16 x 4 = 64), ``num_workers`` / ``prefetch`` / ``backend`` of the
  input pipeline, ``eval_batch_size``; reader options of the folder
  (``reid_jax.embeddings.load_dataset``): ``verify_images`` (False; True: decode every image
  once while reading the folder and fail on one that does not) and ``skip_undecodable``
  (False; with ``verify_images``: leave such images out instead, logged). The training
  augmentation: every field of ``reid_jax.data.augment.AugmentConfig`` (``interpolation``,
  ``flip_prob``, ``pad``, ``erase_prob``, ``erase_area``, ``erase_min_aspect``,
  ``erase_fill``, ``mean``, ``std``) with the reference's values, each one settable on the
  command line (``--config.data.erase_prob=0``).
- ``model``: ``reid_jax.models.agw.default_model_config`` (ResNet-50, last stride 1, non-local
  blocks (0, 2, 3, 0), GeM p=3, the reference's quirks); ``model.dtype`` follows ``dtype``.
  ``model.retrieval_feature`` ("post_bn" | "pre_bn") and ``model.normalize_feature`` (True)
  choose the retrieval embedding that is ranked, fed to the attribute head and explained
  (default: post-BNNeck, L2-normalised, as AGW ranks; documented in
  ``reid_jax.models.agw.retrieval_embedding``).
- ``optim``: ``torch.optim.Adam`` as the reference uses it: ``learning_rate`` 3.5e-4, betas
  (0.9, 0.999), eps 1e-8 and ``weight_decay`` 5e-4 as a *coupled* L2 term added to the gradient
  (torch Adam's ``weight_decay``, not AdamW), on every trainable parameter including BatchNorm
  scales/biases, GeM's p and the classifier (the reference has no exemption; BNNeck's bias is
  frozen and never decayed); ``center_lr`` 0.5 for the center loss's own SGD. Schedule
  (``reid_jax.train.schedules``): per epoch, linear warmup from ``warmup_factor`` 0.01 over
  ``warmup_epochs`` 10, x ``gamma`` 0.1 at ``milestones`` (40, 70).
- ``loss``: ``label_smoothing`` 0.1, ``center_loss_weight`` 5e-4, ``triplet_normalize`` False.
- ``num_epochs`` 120 (sampler epochs, about 200 steps each on Market-1501); ``num_train_steps``
  (> 0: stop after that many steps of the same schedule; -1: all epochs).
- ``log_every_steps``, ``eval_every_epochs`` (0: only at the end), ``checkpoint_every_steps``,
  ``keep_checkpoints`` (the last N are kept), ``seed``.
- ``init_from``: a checkpoint directory from ``tools/convert_torch.py`` (torchvision's ImageNet
  ResNet-50: ``--input=resnet50-19c8e357.pth``) whose backbone initialises the model; empty =
  random initialisation (the published 87.8 mAP needs the ImageNet weights).
- ``dtype``: ``float32``, ``bfloat16`` (backbone compute; parameters, optimizer state and
  BatchNorm statistics stay float32) or ``float64`` (parity tests; needs ``jax.enable_x64``).
  docs/training.md, "Precision".
- ``attributes``: how ``tools/train_attributes.py`` trains the attribute head on the frozen
  embedding (``reid_jax.train.attribute_training.default_config``: epochs, learning_rate,
  batch_size, weight_decay, seed).
- ``explain``: the settings of ``tools/explain.py`` and ``tools/evaluate_explanations.py``
  (``reid_jax.explain.settings.default_config``: k, threshold, mode, order, error_ranks,
  report_queries, chunk sizes, the counterfactual benchmark).

The tools that read a checkpoint use the config stored in it, so these sections travel with the
model; their flags (``--k``, ``--threshold``, ``--epochs``, ...) override single fields.

Note: one revision of the reference yml says ``MAX_EPOCHS: 160``; the AGW paper's recipe and
this project use 120 (nothing changes after epoch 70 but the length).
"""

import ml_collections

from reid_jax.data import augment
from reid_jax.explain import settings as explain_settings
from reid_jax.models.agw import default_model_config
from reid_jax.train import attribute_training


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.dtype = "float32"
    config.init_from = ""

    config.data = ml_collections.ConfigDict()
    # "folder": read the image files under data.root; "tfds": the market1501 TFDS array_record
    # files in data.tfds_data_dir ("" = ~/tensorflow_datasets), config data.tfds_config ("real",
    # or "synthetic" for tools/make_synthetic.py folders), prepared from data.root if missing.
    # Same images, labels and embeddings; tfds reads 3 large files (docs/scaling.md).
    config.data.source = "folder"
    config.data.tfds_data_dir = ""
    config.data.tfds_config = "real"
    config.data.root = ""
    config.data.height = 256
    config.data.width = 128
    config.data.p = 16
    config.data.k = 4
    # The GPU recipe: grain worker processes, about the host's cores minus two (a GPU at 2,500
    # images/s needs several cores of decoding and augmentation, which threads cannot share
    # under the GIL; docs/scaling.md, "Input pipeline"). prefetch is per worker with grain.
    config.data.num_workers = 12
    config.data.prefetch = 2
    config.data.backend = "grain"
    config.data.eval_batch_size = 128
    config.data.verify_images = False
    config.data.skip_undecodable = False
    # The training augmentation, every field of it, so that the command line can change any
    # (--config.data.erase_prob=0): AugmentConfig's defaults are the reference's.
    for name, value in augment.recipe_defaults().items():
        config.data[name] = value

    config.model = default_model_config()
    config.model.dtype = config.get_ref("dtype")

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 3.5e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 5e-4
    config.optim.warmup_epochs = 10
    config.optim.warmup_factor = 0.01
    config.optim.milestones = (40, 70)
    config.optim.gamma = 0.1
    config.optim.center_lr = 0.5

    config.loss = ml_collections.ConfigDict()
    config.loss.label_smoothing = 0.1
    config.loss.center_loss_weight = 5e-4
    config.loss.triplet_normalize = False

    config.num_epochs = 120
    config.num_train_steps = -1
    config.log_every_steps = 50
    config.eval_every_epochs = 40
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3

    config.attributes = attribute_training.default_config()
    config.explain = explain_settings.default_config()
    return config
