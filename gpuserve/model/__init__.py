"""The model side, the only part of gpuserve that touches torch and NVML: device probing,
model sources (files, factories, handlers), loading and the starter config writer."""
