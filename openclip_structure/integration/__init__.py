"""The plugin's integration with open_clip training: one hook per point it needs, one module per
concern, and nothing that replaces an attribute of torch, argparse or any other library.

=================  ===========================================  =================================
concern            hooks (``wrap_<name>(callable) -> callable``)  module
=================  ===========================================  =================================
flags              ``add_arguments``, ``validate``               :mod:`.arguments`
loss               ``create_loss``                               :mod:`.loss`
model              ``create_model_and_transforms``               :mod:`.model`
data               ``get_data``                                  :mod:`.loaders`
parallel           ``distributed_data_parallel``, ``optimizer``  :mod:`.parallel`
checkpoints        ``train_one_epoch``, ``pt_load``              :mod:`.checkpoints`
validation         ``evaluate``, ``get_clip_metrics``            :mod:`.validation`
progress           ``lr_scheduler``                              :mod:`.progress`
=================  ===========================================  =================================

Where they are called from:

* a hook-patched open_clip_train (``python -m openclip_structure.patch``): its
  ``plugins.wrap(name, fn)`` call sites apply our ``wrap_<name>`` (the entry point
  :mod:`openclip_structure.plugin`); nothing is replaced;
* an unpatched open_clip_train 3.x: :mod:`.shim` replaces the names listed in its ``TABLE``
  inside open_clip_train's own modules, for the duration of the launcher's run only;
* open_clip main (4.x dev, task API): :mod:`.task`.

The hooks share one :class:`.state.Run` per training run; :mod:`.hooks` lists them (``HOOKS``). This
``__init__`` imports nothing, so that ``python -m openclip_structure.patch`` (:mod:`.hook_patch`)
does not load torch.
"""
