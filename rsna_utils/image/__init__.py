"""The image: VOI LUT windowing, breast ROI, the per-image plan and its two kernels (numpy on the
CPU, torch on the GPU), the folder runner that writes PNGs, GPU preprocessing."""
