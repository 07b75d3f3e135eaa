"""Pixel decoders as plug-ins, in the manner of pydicom's pixel backends: one module per
decoder (`pydicom`, `imagecodecs`, `dicomsdl` on the CPU; `nvimgcodec`, `dali` on a GPU), looked
up by name by `registry`; `gpu_batch` holds what the GPU plug-ins share (batching, the
self-test that decides which codestreams go to a GPU decoder)."""
