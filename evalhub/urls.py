from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from evalhub import (
    itec_views,
    judge_views,
    model_views,
    promptset_views,
    run_views,
    serving,
    views,
)

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("jobs/", views.job_list, name="job_list"),
    path("jobs/table/", views.job_table, name="job_table"),
    path("jobs/demo/", views.job_demo, name="job_demo"),
    path("jobs/<int:job_id>/", views.job_detail, name="job_detail"),
    path("jobs/<int:job_id>/cancel/", views.job_cancel_view, name="job_cancel"),
    path("models/", model_views.model_list, name="model_list"),
    path("models/import/", model_views.model_import_view, name="model_import"),
    path("models/<int:model_id>/", model_views.model_detail, name="model_detail"),
    path("models/<int:model_id>/posttrain/", model_views.model_posttrain, name="model_posttrain"),
    path("models/<int:model_id>/compress/", model_views.model_compress, name="model_compress"),
    path("models/<int:model_id>/recover/", model_views.model_recover, name="model_recover"),
    path(
        "models/<int:model_id>/adapter/",
        model_views.model_adapter_train,
        name="model_adapter_train",
    ),
    path("models/<int:model_id>/try/", model_views.model_try, name="model_try"),
    path("models/<int:model_id>/track/", run_views.model_track, name="model_track"),
    path("prompt-sets/", promptset_views.prompt_set_list, name="prompt_set_list"),
    path("prompt-sets/import/", promptset_views.prompt_set_import_view, name="prompt_set_import"),
    path(
        "prompt-sets/builtin/", promptset_views.prompt_set_builtin_view, name="prompt_set_builtin"
    ),
    path("prompt-sets/<int:set_id>/", promptset_views.prompt_set_detail, name="prompt_set_detail"),
    path("itec/", itec_views.itec_page, name="itec"),
    path("itec/start/", itec_views.itec_start, name="itec_start"),
    path("leaderboard/", run_views.leaderboard, name="leaderboard"),
    path("runs/", run_views.run_list, name="run_list"),
    path("runs/<int:run_id>/", run_views.run_detail, name="run_detail"),
    path("runs/compare/", run_views.run_compare, name="run_compare"),
    path("api/leaderboard/", run_views.leaderboard_json, name="api_leaderboard"),
    path("api/regressions/", run_views.regressions_json, name="api_regressions"),
    path("api/reward/<slug:name>/score/", run_views.reward_score, name="api_reward_score"),
    path("api/jobs/", views.api_jobs, name="api_jobs"),
    path("api/jobs/<int:job_id>/", views.api_job, name="api_job"),
    path("v1/models", serving.list_models, name="v1_models"),
    path("v1/chat/completions", serving.chat_completions, name="v1_chat"),
    path("v1/completions", serving.completions, name="v1_completions"),
    path(
        "grading/campaigns/<int:campaign_id>/judges/",
        judge_views.campaign_judges,
        name="campaign_judges",
    ),
    path("grading/", include("grading.urls")),
    path("admin/", admin.site.urls),
]
