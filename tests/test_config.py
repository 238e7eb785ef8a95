import os

import pytest

from config import ConfigError, ServerSettings, Settings


def test_defaults():
    s = Settings.from_env({})
    assert (s.box_threshold, s.text_threshold, s.max_detections, s.nms_iou) == (0.3, 0.25, 50, 0.7)
    assert s.segmenter == "mobile_sam"
    assert s.default_prompt is None
    assert s.groundingdino_checkpoint == "models/groundingdino_swint_ogc.pth"
    assert s.groundingdino_text_encoder == "models/bert-base-uncased"
    assert ServerSettings.from_env({}).port == 9090


@pytest.mark.parametrize(
    "env, attr, value",
    [
        ({"USE_SAM": "true"}, "segmenter", "sam"),
        ({"USE_SAM": "true", "USE_MOBILE_SAM": "true"}, "segmenter", "sam"),
        ({"USE_MOBILE_SAM": "false"}, "segmenter", None),
        ({"SAM_MODEL_TYPE": "VIT_B"}, "sam_checkpoint", "models/sam_vit_b_01ec64.pth"),
        ({"MODEL_DIR": "/m"}, "mobilesam_checkpoint", "/m/mobile_sam.pt"),
        ({"BOX_THRESHOLD": "0.5"}, "box_threshold", 0.5),
        ({"DEFAULT_PROMPT": ""}, "default_prompt", ""),
        ({"LABEL_STUDIO_HOST": "http://ls:8080/"}, "label_studio_url", "http://ls:8080"),
        ({"LABEL_STUDIO_URL": "http://a", "LABEL_STUDIO_HOST": "http://b"}, "label_studio_url", "http://a"),
        ({"LABEL_STUDIO_ACCESS_TOKEN": "t"}, "label_studio_api_key", "t"),
        ({}, "engine", "grounded_sam"),
        ({"ENGINE": "SAM3"}, "engine", "sam3"),
        ({"MODEL_DIR": "/m"}, "sam3_checkpoint", "/m/sam3.pt"),
        ({"SAM3_SCORE_THRESHOLD": "0.4"}, "sam3_score_threshold", 0.4),
        ({}, "sam3_score_threshold", 0.5),
        ({}, "job_import_wait", 10.0),
        ({"JOB_IMPORT_WAIT": "2.5"}, "job_import_wait", 2.5),
        ({}, "job_chunk_max", 500),
        ({"JOB_CHUNK_SIZE": "800"}, "job_chunk_max", 800),  # the bound follows a larger chunk
    ],
)
def test_variables(env, attr, value):
    assert getattr(Settings.from_env(env), attr) == value


@pytest.mark.parametrize(
    "env, name",
    [
        ({"BOX_THRESHOLD": "high"}, "BOX_THRESHOLD"),
        ({"TEXT_THRESHOLD": "1.5"}, "TEXT_THRESHOLD"),
        ({"MAX_DETECTIONS": "0"}, "MAX_DETECTIONS"),
        ({"USE_SAM": "maybe"}, "USE_SAM"),
        ({"SAM_MODEL_TYPE": "vit_x"}, "SAM_MODEL_TYPE"),
        ({"DEVICE": "tpu"}, "DEVICE"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"ENGINE": "sam2"}, "ENGINE must be one of grounded_sam, sam3, got 'sam2'"),
        ({"SAM3_SCORE_THRESHOLD": "2"}, "SAM3_SCORE_THRESHOLD"),
        ({"JOB_IMPORT_WAIT": "-1"}, "JOB_IMPORT_WAIT"),
        ({"JOB_CHUNK_SIZE": "60", "JOB_CHUNK_MAX": "40"}, r"JOB_CHUNK_MAX \(40\) must be at least JOB_CHUNK_SIZE"),
    ],
)
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(env)
        ServerSettings.from_env(env)


def test_secrets_are_redacted():
    s = Settings.from_env({"LABEL_STUDIO_API_KEY": "secret-key", "BASIC_AUTH_PASS": "pw"})
    text = str(s.redacted())
    assert "secret-key" not in text and "pw'" not in text


@pytest.mark.parametrize(
    "env, version, variables",
    [
        ({}, "groundingdino_swint_ogc+mobile_sam", ["GROUNDINGDINO_CHECKPOINT", "MOBILESAM_CHECKPOINT"]),
        ({"ENGINE": "sam3"}, "sam3+mobile_sam", ["SAM3_CHECKPOINT", "SAM3_TOKENIZER", "MOBILESAM_CHECKPOINT"]),
        ({"ENGINE": "sam3", "USE_MOBILE_SAM": "false", "SAM3_CHECKPOINT": "/w/sam3-ft.pt"}, "sam3-ft",
         ["SAM3_CHECKPOINT", "SAM3_TOKENIZER"]),
        ({"ENGINE": "sam3", "USE_SAM": "true", "SAM_MODEL_TYPE": "vit_b"}, "sam3+sam_vit_b_01ec64",
         ["SAM3_CHECKPOINT", "SAM3_TOKENIZER", "SAM_CHECKPOINT"]),
    ],
)
def test_the_engine_decides_the_model_files_and_the_model_version(env, version, variables):
    settings = Settings.from_env(env)
    assert settings.model_version == version
    assert [c.variable for c in settings.checkpoints()] == variables


def test_the_sam3_tokenizer_defaults_to_the_copy_open_clip_ships():
    tokenizer = Settings.from_env({"ENGINE": "sam3"}).sam3_tokenizer
    assert tokenizer.endswith("/open_clip/bpe_simple_vocab_16e6.txt.gz") and os.path.isfile(tokenizer)
