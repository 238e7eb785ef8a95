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
