"""The form field of a LatentImageField: a file input that validates like an assignment."""

from __future__ import annotations

from typing import Any

from django import forms

from latentstore.staging import stage


class LatentImageFormField(forms.FileField):
    """A file input that validates the image cheaply (format, pixel cap, header) on clean()."""

    default_error_messages = {
        **forms.FileField.default_error_messages,
    }

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("max_length", None)
        super().__init__(**kwargs)

    def to_python(self, data: Any) -> Any:
        data = super().to_python(data)
        if data is None:
            return None
        # construct_instance() hands this to the field's save_form_data(); the staged upload
        # carries the validated bytes so nothing is read twice.
        return stage(data)

    def widget_attrs(self, widget: forms.Widget) -> dict[str, Any]:
        attrs = super().widget_attrs(widget)
        if isinstance(widget, forms.FileInput) and "accept" not in widget.attrs:
            attrs.setdefault("accept", "image/*")
        return attrs
