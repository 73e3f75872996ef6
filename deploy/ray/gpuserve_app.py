"""The Ray Serve application KubeRay deploys (`import_path: gpuserve_app:app`).

Ray imports an application by path, so the settings are read here, at import, on the cluster:
from the file named by GPUSERVE_CONFIG_FILE (configs/ray.toml in the image) and GPUSERVE_*
variables. Regenerate the RayService's serveConfigV2 after changing them:

    GPUSERVE_CONFIG_FILE=configs/ray.toml serve build gpuserve_app:app --app-dir deploy/ray
"""

from gpuserve.config import Settings
from gpuserve.ray_serve import deployment

app = deployment(Settings())
