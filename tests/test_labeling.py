import pytest

from labeling import Control, LabelConfigError, parse_label_config

GUIDE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <View className="prompt">
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  </View>
  <RectangleLabels name="label" toName="image">
    <Label value="cats" background="yellow"/>
    <Label value="house" background="blue"/>
  </RectangleLabels>
  <BrushLabels name="label2" toName="image">
    <Label value="cats" background="yellow"/>
    <Label value="house" background="blue"/>
  </BrushLabels>
</View>"""


def test_guide_config():
    config = parse_label_config(GUIDE_CONFIG)
    assert (config.image_name, config.image_key, config.prompt_name) == ("image", "image", "prompt")
    assert config.rectangles == (Control("label", ("cats", "house")),)
    assert config.brushes == (Control("label2", ("cats", "house")),)
    assert config.labels == ("cats", "house")


def test_brush_only_without_prompt_and_predicted_values():
    config = parse_label_config("""<View><Image name="img" value="$photo"/>
      <BrushLabels name="masks" toName="img">
        <Label value="Car" predicted_values="automobile, truck"/><Label value="tree"/>
      </BrushLabels></View>""")
    assert (config.image_name, config.image_key, config.prompt_name) == ("img", "photo", None)
    assert config.rectangles == ()
    assert config.labels == ("Car", "tree")
    assert config.predicted_values == {"Car": ("automobile", "truck")}


def test_polygon_labels_alone_are_enough():
    config = parse_label_config("""<View><Image name="img" value="$image"/>
      <TextArea name="prompt" toName="img"/>
      <PolygonLabels name="outline" toName="img"><Label value="roof" predicted_values="rooftop"/></PolygonLabels>
      <KeyPointLabels name="kp" toName="img" smart="true"><Label value="roof"/></KeyPointLabels></View>""")
    assert (config.rectangles, config.brushes) == ((), ())
    assert config.polygons == (Control("outline", ("roof",)),)
    assert config.labels == config.mask_labels == ("roof",)
    assert config.wants_masks
    assert config.predicted_values == {"roof": ("rooftop",)}
    assert not parse_label_config(GUIDE_CONFIG.replace("BrushLabels", "RectangleLabels")).wants_masks


def test_controls_of_other_images_are_ignored():
    config = parse_label_config("""<View>
      <Image name="a" value="$a"/><Image name="b" value="$b"/>
      <RectangleLabels name="ra" toName="a"><Label value="x"/></RectangleLabels>
      <RectangleLabels name="rb" toName="b"><Label value="y"/></RectangleLabels>
      <KeyPointLabels name="kp" toName="a" smart="true"><Label value="x"/></KeyPointLabels></View>""")
    assert config.image_name == "a"
    assert config.rectangles == (Control("ra", ("x",)),)
    assert config.keypoints == (Control("kp", ("x",), smart=True),)


@pytest.mark.parametrize(
    "xml, message",
    [
        ("", "empty"),
        ("not xml at all", "not valid XML"),
        ("<View><Image name='i' value='$i'/>", "not valid XML"),
        ("<View><Text name='t' value='$t'/><Choices name='c' toName='t'><Choice value='a'/></Choices></View>",
         "no <Image>"),
        ("<View><Image name='i' value='$i'/><Choices name='c' toName='i'><Choice value='a'/></Choices></View>",
         "no <RectangleLabels>, <BrushLabels> or <PolygonLabels>"),
    ],
)
def test_unusable_configs(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


@pytest.mark.parametrize("data, url", [
    ({"image": "s3://b/k.png"}, "s3://b/k.png"),
    ({"$undefined$": "s3://b/k.png"}, "s3://b/k.png"),  # a storage synced as "every object is a source file"
    ({"image": "a.png", "$undefined$": "b.png"}, "a.png"),
    ({"image": ""}, None), ({"other": "a.png"}, None), ({"image": 3}, None), (None, None), ("a.png", None),
])
def test_image_url_of_task_data(data, url):
    assert parse_label_config(GUIDE_CONFIG).image_url(data) == url
