"""Ray Serve glue of zipvl-ray: the ingress, vision and LLM deployments and the app builder.

``deployments.app:build_app`` is the import path of ``configs/zipvl.yaml``; see ``docs/serving.md``.
"""

import warnings

# With RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1, Ray warns on every pickled tensor that only read-only,
# contiguous, detached tensors are safe. Pixels and features crossing the stages are exactly that
# (nothing writes to them after they are sent), so the warning would only flood the replica logs.
warnings.filterwarnings("ignore", message="Zero-copy tensor serialization is enabled")
