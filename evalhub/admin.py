from django.contrib import admin

from core.models import ApiToken, Job, JobStep
from evalhub.models import ModelVersion


class JobStepInline(admin.TabularInline):
    model = JobStep
    extra = 0
    readonly_fields = ("key", "output", "attempt", "created_at")
    can_delete = False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "status", "progress", "attempts", "created_by", "created_at")
    list_filter = ("status", "kind", "queue")
    search_fields = ("kind", "message", "error", "celery_task_id")
    readonly_fields = ("created_at", "started_at", "finished_at", "updated_at", "celery_task_id")
    list_select_related = ("created_by",)
    inlines = [JobStepInline]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "key_prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("key_hash", "key_prefix", "created_at", "last_used_at")
    list_select_related = ("user",)


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "kind",
        "backend",
        "n_params",
        "bits_per_weight",
        "relation",
        "parent",
        "tracked",
        "created_at",
    )
    list_filter = ("kind", "backend", "tracked", "relation")
    search_fields = ("name", "location", "source")
    list_select_related = ("parent",)
