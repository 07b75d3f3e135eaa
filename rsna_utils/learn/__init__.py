"""Learning: datasets and samplers, backbones and their pretrained weights, the checkpoint
contract, training and the metrics it selects by."""
