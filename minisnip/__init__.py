"""minisnip: BERT pruning by spectral-normalized identity priors (Lin et al., Findings of EMNLP 2020), from scratch."""

from .checkpoint import default_model_path
from .config import BertConfig, LayerShape
from .model import BertForSequenceClassification, BertModel
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["BertConfig", "BertForSequenceClassification", "BertModel", "LayerShape", "Tokenizer",
           "default_model_path", "load_tokenizer"]
__version__ = "0.1.0"
