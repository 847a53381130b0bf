"""Pretrained weights in and out: `alexcli import` (torchvision's and Caffe's AlexNets into alexcli
checkpoints) and `alexcli export` (ONNX)."""
