"""What users type: the ``xfuser`` and ``cfx-xdit`` launchers, flags, YAML configs, the dry run.

Nothing here imports xfuser or torch at load: the launchers answer usage errors before any rank starts.
"""
