"""What a project's labeling config asks for, read with label_studio_sdk's LabelInterface."""

from __future__ import annotations

from dataclasses import dataclass, field

from label_studio_sdk.label_interface import LabelInterface

from errors import LabelConfigError

__all__ = ["Control", "LabelConfigError", "LabelingConfig", "default_label_config", "parse_label_config"]


@dataclass(frozen=True)
class Control:
    """One labels control on the image, e.g. <RectangleLabels name="label" toName="image">."""

    name: str
    labels: tuple[str, ...]
    smart: bool = False


UNDEFINED_KEY = "$undefined$"  # Label Studio's data key for an object synced from storage as a source file


@dataclass(frozen=True)
class LabelingConfig:
    image_name: str  # the Image tag's name: every region's to_name
    image_key: str  # the task data key holding the image URL ("$image" -> "image")
    prompt_name: str | None  # the TextArea on that image that holds the text prompt
    rectangles: tuple[Control, ...] = ()
    brushes: tuple[Control, ...] = ()
    polygons: tuple[Control, ...] = ()
    keypoints: tuple[Control, ...] = ()
    # label -> extra phrases that mean it, from <Label predicted_values="a,b">
    predicted_values: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def image_url(self, data) -> str | None:
        """The image URL of a task's data: under `image_key`, else under Label Studio's "$undefined$" key, which a
        cloud storage synced with "Treat every bucket object as a source file" writes (the labeling UI reads it as
        the config's image too). None when there is none."""
        if not isinstance(data, dict):
            return None
        url = data.get(self.image_key, data.get(UNDEFINED_KEY))
        return url if isinstance(url, str) and url else None

    @property
    def wants_masks(self) -> bool:
        """Whether any region this config takes is drawn from a mask (a brush or a polygon)."""
        return bool(self.brushes or self.polygons)

    @property
    def mask_labels(self) -> tuple[str, ...]:
        """Every label of the brush and polygon controls (what a SAM click can be labeled), once each."""
        return tuple(dict.fromkeys(label for control in self.brushes + self.polygons for label in control.labels))

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label of the rectangle, brush and polygon controls, in config order, once each."""
        seen: dict[str, None] = {}
        for control in self.rectangles + self.brushes + self.polygons:
            seen.update(dict.fromkeys(control.labels))
        return tuple(seen)


def parse_label_config(xml: str) -> LabelingConfig:
    """Find the Image, its prompt TextArea and its RectangleLabels / BrushLabels / PolygonLabels controls."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("label config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as e:  # the SDK raises several XML error types
        raise LabelConfigError(f"label config is not valid XML: {e}") from None

    images = [o for o in interface.objects if o.tag.lower() == "image"]
    if not images:
        raise LabelConfigError("label config has no <Image> tag")
    region_kinds = ("rectanglelabels", "brushlabels", "polygonlabels")
    by_kind: dict[str, list] = {kind: [] for kind in (*region_kinds, "keypointlabels", "textarea")}
    image = None
    for candidate in images:  # the first image that has a labels control wins
        controls = [c for c in interface.controls if candidate.name in (c.to_name or [])]
        if any(c.tag.lower() in region_kinds for c in controls):
            image = candidate
            for c in controls:
                if c.tag.lower() in by_kind:
                    by_kind[c.tag.lower()].append(c)
            break
    if image is None:
        raise LabelConfigError(
            "label config has no <RectangleLabels>, <BrushLabels> or <PolygonLabels> control on an <Image>: "
            "this backend predicts rectangles, brush masks and polygons"
        )

    def control(c) -> Control:
        return Control(c.name, tuple(c.labels or ()), str(c.attr.get("smart", "")).lower() == "true")

    predicted_values: dict[str, tuple[str, ...]] = {}
    for c in by_kind["rectanglelabels"] + by_kind["brushlabels"] + by_kind["polygonlabels"]:
        for label, attrs in (getattr(c, "labels_attrs", None) or {}).items():
            values = [v.strip() for v in str(attrs.attr.get("predicted_values", "")).split(",") if v.strip()]
            if values:
                predicted_values[label] = tuple(dict.fromkeys(predicted_values.get(label, ()) + tuple(values)))
    prompts = by_kind["textarea"]
    return LabelingConfig(
        image_name=image.name,
        image_key=str(image.value).lstrip("$"),
        prompt_name=prompts[0].name if prompts else None,
        rectangles=tuple(control(c) for c in by_kind["rectanglelabels"]),
        brushes=tuple(control(c) for c in by_kind["brushlabels"]),
        polygons=tuple(control(c) for c in by_kind["polygonlabels"]),
        keypoints=tuple(control(c) for c in by_kind["keypointlabels"]),
        predicted_values=predicted_values,
    )


def default_label_config(labels: tuple[str, ...]) -> str:
    """The README's labeling config (an image, a prompt TextArea, RectangleLabels "label" and BrushLabels
    "label2") with these labels: what the command line uses when it is given no config."""
    from xml.sax.saxutils import quoteattr

    items = "".join(f"\n    <Label value={quoteattr(label)}/>" for label in labels)
    return (f'<View>\n  <Image name="image" value="$image"/>\n  <TextArea name="prompt" toName="image"/>\n'
            f'  <RectangleLabels name="label" toName="image">{items}\n  </RectangleLabels>\n'
            f'  <BrushLabels name="label2" toName="image">{items}\n  </BrushLabels>\n</View>')
