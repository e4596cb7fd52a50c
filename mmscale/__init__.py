"""mmscale: DeepSpeed-based multimodal contrastive pretraining and fusion fine-tuning."""
__version__ = "0.1.0"
