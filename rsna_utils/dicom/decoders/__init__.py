"""Pixel decoders as plug-ins, in the manner of pydicom's pixel backends: one module per
decoder in `plugins/` (`pydicom`, `imagecodecs`, `dicomsdl` on the CPU; `nvimgcodec`, `dali` on
a GPU), found there by `registry`, which probes them once per run into a `DecoderSet`;
`gpu_shared` holds what the GPU plug-ins share (batching, the self-test that decides which
codestreams go to a GPU decoder) and names none of them; `gpu_batch` picks and builds a GPU
plug-in by name through `registry` (no plug-in imports either)."""
