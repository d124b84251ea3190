from django.contrib import admin
from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from apps.inference import views as inference
from apps.inference.views_infer import infer
from apps.registry import views as registry
from gridsite import views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("healthz", views.healthz),
    path("admin/", admin.site.urls),
    path("api/models/", inference.ModelListView.as_view()),
    path("api/models/<str:model_id>/", inference.ModelDetailView.as_view()),
    path("api/models/<str:model_id>/infer/", infer),
    path("api/nodes/", registry.NodeListView.as_view()),
    path("api/nodes/disconnect/", registry.DisconnectNodesView.as_view()),
    path("api/nodes/<int:node_id>/", registry.NodeDetailView.as_view()),
    path("api/search/", registry.SearchView.as_view()),
    path("api/tags/", registry.TagListView.as_view()),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema")),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema")),
]

handler404 = "gridsite.errors.not_found"
handler500 = "gridsite.errors.server_error"
