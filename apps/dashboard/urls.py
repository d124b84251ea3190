from django.contrib.auth import views as auth_views
from django.urls import path

from apps.dashboard import actions, views

app_name = "dashboard"

urlpatterns = [
    path("", views.overview, name="overview"),
    path(
        "login/",
        auth_views.LoginView.as_view(
            template_name="dashboard/login.html", redirect_authenticated_user=True
        ),
        name="login",
    ),
    path(
        "logout/",
        auth_views.LogoutView.as_view(next_page="dashboard:login"),
        name="logout",
    ),
    path("nodes/", views.nodes, name="nodes"),
    path("nodes/disconnect-all/", actions.disconnect_all, name="disconnect-all"),
    path("nodes/<int:node_id>/", views.node_detail, name="node"),
    path("nodes/<int:node_id>/drain/", actions.drain_node, name="drain"),
    path("nodes/<int:node_id>/resume/", actions.resume_node, name="resume"),
    path("nodes/<int:node_id>/disconnect/", actions.disconnect_node, name="disconnect"),
    path("models/", views.models, name="models"),
    path("models/<str:model_id>/", views.model_detail, name="model"),
    path("models/<str:model_id>/replace/", actions.replace_model, name="replace"),
    path("models/<str:model_id>/delete/", actions.delete_model, name="delete"),
    path("jobs/", views.jobs, name="jobs"),
    path("search/", views.search, name="search"),
]
