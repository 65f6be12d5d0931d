"""Reproduction companion for "An Integrated Approach to Produce Robust Deep Neural Network Models
with High Efficiency" (Li, Wang, Xin; LOD 2021): Binary-Relax quantization of adversarially trained
EnResNets on CIFAR-10."""

__version__ = "0.1.0"
