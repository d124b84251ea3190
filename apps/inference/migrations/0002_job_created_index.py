from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0001_initial"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="inferencejob",
            index=models.Index(fields=["created"], name="job_created"),
        ),
    ]
