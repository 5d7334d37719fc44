from django.contrib import admin

from grading.forms import CampaignForm
from grading.models import Assignment, Campaign, Item, Label, Response


@admin.register(Campaign)
class CampaignAdmin(admin.ModelAdmin):
    form = CampaignForm  # the same checks of aspects and thresholds as the campaign page
    list_display = (
        "name",
        "kind",
        "status",
        "overlap",
        "gold_rate",
        "quota_per_rater",
        "created_at",
    )
    list_filter = ("kind", "status")
    search_fields = ("name",)
    filter_horizontal = ("raters",)


class ResponseInline(admin.TabularInline):
    model = Response
    extra = 0


@admin.register(Item)
class ItemAdmin(admin.ModelAdmin):
    list_display = ("id", "campaign", "external_id", "is_gold", "taken", "labelled")
    list_filter = ("campaign", "is_gold")
    search_fields = ("external_id", "prompt")
    inlines = [ResponseInline]
    list_select_related = ("campaign",)


@admin.register(Assignment)
class AssignmentAdmin(admin.ModelAdmin):
    list_display = ("id", "campaign", "item", "rater", "status", "leased_at", "expires_at")
    list_filter = ("status", "campaign")
    raw_id_fields = ("item",)
    list_select_related = ("campaign", "rater")


@admin.register(Label)
class LabelAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "campaign",
        "item",
        "rater",
        "level",
        "unsafe",
        "late",
        "gold_correct",
        "created_at",
    )
    list_filter = ("campaign", "level", "unsafe", "late", "gold_correct")
    raw_id_fields = ("item", "assignment", "preferred")
    list_select_related = ("campaign", "rater")
