"""Tiny open_clip configs of every model family users train, written offline into a folder:
built-in ViT + text transformer, ModifiedResNet, a timm tower (timm's test_resnet, pretrained=False), an HF text tower
(a tiny BERT config and WordPiece tokenizer written here), CustomTextCLIP, CoCa and SigLIP.

``write_family_configs(root)`` returns ``{family: model name}``; the configs live in
``root/configs`` (give it to ``--model-config-dir`` or ``open_clip.add_model_config``)."""
import json
import os

#: family -> (model name, extra launcher flags)
FAMILIES = {
    "vit": ("family-vit", []),
    "resnet": ("family-rn", []),
    "timm": ("family-timm", []),
    "hf_text": ("family-hf", []),
    "custom_text": ("family-custom-text", []),
    "coca": ("family-coca", []),
    "siglip": ("family-sigmoid", ["--siglip"]),
}

_VISION_VIT = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8}
_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
_WORDS = ["a", "an", "the", "photo", "of", "number", "digit", "handwritten", "zero", "one", "two", "three", "four",
          "five", "six", "seven", "eight", "nine", "picture", "small", "image", "drawing", "written", "by", "hand"]


def write_hf_text_model(folder: str) -> str:
    """A tiny, randomly initialised BERT (config + weights) and a WordPiece vocabulary in ``folder``,
    made here with no download: what open_clip's ``hf_model_name``/``hf_tokenizer_name`` read."""
    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS + [str(i) for i in range(10)] + [".", ","]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    # randomly initialised weights saved here: open_clip's launcher loads HF towers with from_pretrained
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 16}, f)
    return folder


def family_configs(hf_folder: str) -> dict:
    """model name -> open_clip config."""
    return {
        "family-vit": {"embed_dim": 32, "vision_cfg": dict(_VISION_VIT), "text_cfg": dict(_TEXT)},
        "family-rn": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16,
                                                       "head_width": 16}, "text_cfg": dict(_TEXT)},
        "family-timm": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "test_resnet",
                                                         "timm_model_pretrained": False, "timm_pool": "avg",
                                                         "timm_proj": "linear"},
                        "text_cfg": dict(_TEXT)},
        "family-hf": {"embed_dim": 32, "vision_cfg": dict(_VISION_VIT),
                      "text_cfg": {"hf_model_name": hf_folder, "hf_tokenizer_name": hf_folder,
                                   "hf_model_pretrained": False, "hf_proj_type": "mlp",
                                   "hf_pooler_type": "mean_pooler", "context_length": 16}},
        "family-custom-text": {"embed_dim": 32, "custom_text": True, "vision_cfg": dict(_VISION_VIT),
                               "text_cfg": dict(_TEXT)},
        "family-coca": {"embed_dim": 64, "custom_text": True,
                        "vision_cfg": dict(_VISION_VIT, attentional_pool=True, attn_pooler_heads=2,
                                           attn_pooler_queries=8, output_tokens=True),
                        "text_cfg": dict(_TEXT, embed_cls=True, output_tokens=True),
                        "multimodal_cfg": dict(_TEXT, attn_pooler_heads=2)},
        "family-sigmoid": {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
                          "vision_cfg": dict(_VISION_VIT), "text_cfg": dict(_TEXT)},
    }


def write_family_configs(root: str) -> dict:
    """Write every family's config into ``root/configs``; ``{family: model name}``."""
    hf = write_hf_text_model(os.path.join(root, "hf-tiny-bert"))
    configs = os.path.join(root, "configs")
    os.makedirs(configs, exist_ok=True)
    for name, cfg in family_configs(hf).items():
        with open(os.path.join(configs, f"{name}.json"), "w") as f:
            json.dump(cfg, f)
    return {family: name for family, (name, _) in FAMILIES.items()}
