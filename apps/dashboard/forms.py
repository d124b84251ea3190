"""Filter and search forms of the dashboard. All are read with GET."""

from __future__ import annotations

from django import forms

from apps.inference.models import InferenceJob, Model
from apps.registry.models import Node
from apps.registry.views import TAG

MAX_TAGS = 20


class JobFilterForm(forms.Form):
    status = forms.ChoiceField(
        required=False, choices=[("", "Any status"), *InferenceJob.Status.choices]
    )
    model = forms.ChoiceField(required=False, label="Model")
    node = forms.TypedChoiceField(
        required=False, coerce=int, empty_value=None, label="Node"
    )
    failovers = forms.BooleanField(required=False, label="Failed over only")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model_ids = Model.objects.order_by("model_id").values_list(
            "model_id", flat=True
        )
        self.fields["model"].choices = [("", "Any model"), *((m, m) for m in model_ids)]
        nodes = Node.objects.order_by("name").values_list("pk", "name")
        self.fields["node"].choices = [("", "Any node"), *nodes]


class TagSearchForm(forms.Form):
    tags = forms.CharField(
        required=False,
        max_length=1000,
        help_text="Comma-separated. A dataset matches when it carries every tag.",
    )
    include_offline = forms.BooleanField(
        required=False, label="Include datasets on offline nodes"
    )

    def clean_tags(self) -> list[str]:
        raw = self.cleaned_data["tags"]
        tags = [tag.strip() for tag in raw.split(",") if tag.strip()]
        if len(tags) > MAX_TAGS:
            raise forms.ValidationError(
                f"Search with at most {MAX_TAGS} tags; {len(tags)} were given."
            )
        for tag in tags:
            if not TAG.match(tag):
                raise forms.ValidationError(
                    f"Tag {tag!r} is invalid: a tag is 1-64 letters, digits, '_', '.', ':' or '-', starting with a letter or digit."
                )
        return tags
