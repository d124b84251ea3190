from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from apps.inference import views as inference
from apps.inference import views_jobs as jobs
from apps.inference.views_download import download
from apps.inference.views_dataset import infer_dataset
from apps.inference.views_infer import infer
from apps.registry import views as registry
from gridsite import health, metrics, views

urlpatterns = [
    path("", include("apps.dashboard.urls")),
    path("healthz", views.healthz),
    path("readyz", health.readyz),
    path("metrics", metrics.metrics),
    path("admin/", admin.site.urls),
    path("api/models/", inference.ModelListView.as_view()),
    path("api/models/<str:model_id>/", inference.ModelDetailView.as_view()),
    path("api/models/<str:model_id>/infer/", infer),
    path("api/models/<str:model_id>/infer-dataset/", infer_dataset),
    path("api/models/<str:model_id>/nodes/", inference.ModelNodesView.as_view()),
    path("api/models/<str:model_id>/download/", download),
    path("api/jobs/", jobs.create_job),
    path("api/jobs/<uuid:job_id>/", jobs.job_detail),
    path("api/jobs/<uuid:job_id>/result/", jobs.job_result),
    path("api/nodes/", registry.NodeListView.as_view()),
    path("api/nodes/disconnect/", registry.DisconnectNodesView.as_view()),
    path("api/nodes/<int:node_id>/", registry.NodeDetailView.as_view()),
    path("api/search/", registry.SearchView.as_view()),
    path("api/tags/", registry.TagListView.as_view()),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema")),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema")),
]

handler400 = "gridsite.errors.bad_request"
handler403 = "gridsite.errors.permission_denied"
handler404 = "gridsite.errors.not_found"
handler500 = "gridsite.errors.server_error"
